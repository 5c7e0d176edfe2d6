"""Every error in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

Bad input is a 4xx with a message that names the field and what is expected: request
validation (pydantic), the run settings' checks and the engine's LvrError (which only
ever describes something the request asked for). A 500 means a bug of lvr-local (an
InternalError, or any other exception): its message gives a request id, and the server's
log holds the traceback under the same id.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lvr_local.errors import LvrError

log = logging.getLogger("lvr_local.server")

TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "server_error"}
CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ApiError(Exception):
    """An error response: status, message and, where one field is at fault, its name."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or CODES.get(status)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def internal_error(exc: BaseException, where: str) -> ApiError:
    """A bug answered as 500: the traceback is logged under a fresh request id that the
    answer names, so that a user's report leads to it."""
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error %s, request id %s", where, request_id, exc_info=exc)
    return ApiError(
        500,
        f"internal server error ({type(exc).__name__}), request id {request_id}: "
        "the server's log holds the traceback",
        code="internal_error",
        headers={"X-Request-Id": request_id},
    )


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem pydantic found, as one sentence naming the field."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "the request body is not valid")
    first = errors[0]
    kind, loc = first.get("type", ""), [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union branches appear in the location as type names ('str', 'list[...]'): drop them.
    path = [p for p in loc if p.isidentifier() or p.isdigit()]
    param = ".".join(p for p in path if p not in ("str", "int", "float", "bool")) or None
    if kind == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('msg', '')}")
    if kind == "missing" and param is None:  # no body at all
        return ApiError(400, "the request has no body: send a JSON object")
    if kind == "missing":
        return ApiError(400, f"missing required field '{param}'", param=param)
    if kind == "extra_forbidden":
        return ApiError(
            400, f"unsupported field '{param}': lvr serve does not implement it", param=param
        )
    if param is None and isinstance(first.get("input"), bytes):
        return ApiError(400, "send the body as a JSON object with 'Content-Type: application/json'")
    if param is None:
        return ApiError(400, f"the body must be a JSON object ({first.get('msg', '')})")
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return ApiError(400, f"invalid '{param}': {first.get('msg', '')}, got {got}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return ApiError(exc.status_code, message, headers=exc.headers).response()

    async def lvr_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    async def bug(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc, f"on {request.method} {request.url.path}").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(LvrError, lvr_error)
    app.add_exception_handler(Exception, bug)
