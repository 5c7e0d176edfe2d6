"""The Textual terminal chat UI of lvr-local (`lvr tui`, `python -m tui`)."""
