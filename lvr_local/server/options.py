"""How the server listens and what it admits. Light on purpose (no FastAPI, no
uvicorn): the CLI reads its defaults when it defines `lvr serve`'s flags."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from lvr_local.errors import LvrError


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # localhost only, unless asked
    port: int = 8000
    api_key: str | None = None  # None: no key needed
    max_queue: int = 4  # requests that may wait while one generates
    max_body: int = 1_000_000  # bytes of a request body


def check_address(host: str, port: int) -> None:
    """Bind `host:port` as uvicorn will, and let it go: a busy port or an address that is
    not this machine's is refused before the models load (minutes), not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as e:
        raise LvrError(
            f"--host {host}: not an address or a name this machine can resolve ({e.strerror})"
        ) from e
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            reason = "the port is in use (another server?): choose another --port"
        elif e.errno == errno.EADDRNOTAVAIL:
            reason = "that address is not one of this machine's: see --host"
        else:
            reason = e.strerror or str(e)
        raise LvrError(f"cannot listen on {host}:{port}: {reason}") from e
