"""`lvr eval`: tasks, the systems compared, isolated code execution, the loop, results."""
