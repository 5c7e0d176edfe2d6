"""`lvr serve`: the ensemble behind an OpenAI-compatible HTTP API.

A presenter of the runner, like the CLI and the TUI: requests become run settings
(`plan.py`), one worker thread owns the runner and runs one generation at a time
behind a bounded queue (`worker.py`, `jobs.py`), and the runner's events become
OpenAI's JSON and server-sent events (`reply.py`, `responses.py`). `app.py` assembles
the FastAPI application and serves it with uvicorn; `options.py` holds how the server
itself listens and what it admits.
"""
