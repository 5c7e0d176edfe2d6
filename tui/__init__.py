"""Textual chat UI for lvr-local ensembles (`lvr tui`)."""
