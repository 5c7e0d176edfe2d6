"""What this machine offers the models: its physical CPU cores."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores usable by this process (more threads than that slow llama.cpp down)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))
