"""The FastAPI application over one runner, and `serve`, which runs it with uvicorn.

uvicorn handles SIGINT and SIGTERM: it stops accepting connections and waits for the
running responses. Before it waits, `Server.shutdown` stops the worker: the generation
in flight ends within a piece, so a stream closes with its finish reason and `[DONE]`
and a whole reply is sent with what it has; requests still waiting get a 503. Then the
lifespan's end joins the worker thread, and the caller closes the runner, with no decode
in flight, and exits 130 or 143 like every command that a signal stopped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI

from lvr_local import __version__
from lvr_local.runner.run import Runner
from lvr_local.server.endpoints import ServerState, model_entries, router
from lvr_local.server.errors import install_error_handlers
from lvr_local.server.middleware import ApiKey, BodyLimit, RequestLog
from lvr_local.server.options import ServerOptions
from lvr_local.server.worker import GenerationWorker

log = logging.getLogger("lvr_local.server")
GRACE_S = 5  # how long running responses may go on after a shutdown signal
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def create_app(runner: Runner, options: ServerOptions) -> FastAPI:
    """The application over a loaded runner; its worker thread lives with the lifespan."""
    worker = GenerationWorker(runner, options.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.close()

    app = FastAPI(
        title="lvr-local",
        version=__version__,
        description="Several local GGUF models as one, behind an OpenAI-compatible API.",
        lifespan=lifespan,
        strict_content_type=False,  # a body without Content-Type is read as JSON
    )
    names = [m.name for m in runner.members]
    app.state.lvr = ServerState(runner, worker, names, model_entries(runner, int(time.time())))
    install_error_handlers(app)
    app.include_router(router)
    # Starlette runs the last added outermost: log, then key, then size.
    app.add_middleware(BodyLimit, max_bytes=options.max_body)
    app.add_middleware(ApiKey, key=options.api_key)
    app.add_middleware(RequestLog)
    return app


def serve(runner: Runner, options: ServerOptions) -> int | None:
    """Serve until SIGINT or SIGTERM; returns, once the worker has stopped, the signal
    that stopped it."""
    app = create_app(runner, options)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        access_log=False,  # RequestLog writes one line per request, with its pieces
        log_config=_log_config(),
        timeout_graceful_shutdown=GRACE_S,
    )
    if options.api_key is None and options.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: whoever reaches it may use it", options.host)
    with _signals_kept() as received:
        Server(config, app.state.lvr.worker).run()
    if not received:
        return None
    log.info("stopped by %s", signal.Signals(received[0]).name)
    return received[0]


class Server(uvicorn.Server):
    """uvicorn's server, which ends the generations in flight as soon as it starts to
    shut down, rather than letting them run into the grace period and be cancelled."""

    def __init__(self, config: uvicorn.Config, worker: GenerationWorker) -> None:
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.worker.stop()
        await super().shutdown(sockets)


@contextlib.contextmanager
def _signals_kept() -> Iterator[list[int]]:
    """After its graceful shutdown uvicorn raises the signal again, for the default
    action: SIGTERM would kill the process before the runner is closed, SIGINT would
    surface as a KeyboardInterrupt. Catch that second delivery; the caller returns."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread gets signals (uvicorn then installs none)
        return
    previous = {sig: signal.signal(sig, lambda s, _: received.append(s)) for sig in SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _log_config() -> dict:
    """uvicorn's logging, with this package's logger on the same handler."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["lvr_local.server"] = {
        "handlers": ["default"],
        "level": "INFO",
        "propagate": False,
    }
    return config
