"""How the server listens and what it admits. Light on purpose (no FastAPI, no
uvicorn): the CLI reads its defaults when it defines `lvr serve`'s flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # localhost only, unless asked
    port: int = 8000
    api_key: str | None = None  # None: no key needed
    max_queue: int = 4  # requests that may wait while one generates
    max_body: int = 1_000_000  # bytes of a request body
