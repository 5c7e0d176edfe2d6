"""Plain ASGI middleware (they must not buffer a stream nor swallow a disconnect): one
log line per request, the API key, and a request-size limit.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lvr_local.server.errors import ApiError

log = logging.getLogger("lvr_local.server")


class BodyLimit:
    """Refuse bodies over `max_bytes` with a 413, before the application reads them: by
    their Content-Length, or, for a chunked body, by reading at most max_bytes + 1."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(send)
                return
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, send: Send) -> None:
        await send_error(
            send, ApiError(413, f"the request body is larger than {self.max_bytes} bytes")
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then whatever the client sends (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class RequestLog:
    """One line per request once its response is over: method, path, status, pieces
    (set by the handler in the request's state) and seconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        status = [499]  # until a response starts: the client left first
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            if status[0] == 499:  # answered by the error handler outside this middleware
                status[0] = 500
            raise
        finally:
            reply = state.get("reply")
            pieces = reply.n_pieces if reply is not None else 0
            log.info(
                "%s %s %d pieces=%d %.2fs",
                scope["method"],
                scope["path"],
                status[0],
                pieces,
                time.perf_counter() - started,
            )


class ApiKey:
    """With a key set, every /v1/ request needs `Authorization: Bearer KEY`, compared in
    constant time, before its body is read. /health and the API's docs stay open."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers", ())).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not given:
            error = ApiError(
                401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key"
            )
        elif not hmac.compare_digest(given.strip(), self.key):
            error = ApiError(401, "the API key is wrong", code="invalid_api_key")
        else:
            await self.app(scope, receive, send)
            return
        await send_error(send, error)


async def send_error(send: Send, error: ApiError) -> None:
    """An error response written straight to ASGI (before any application code)."""
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(error.body()).encode()})
