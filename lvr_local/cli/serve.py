"""`lvr serve`: the ensemble behind an OpenAI-compatible HTTP API (lvr_local/server)."""

from __future__ import annotations

from typing import Any

import click

from lvr_local import interrupts
from lvr_local.cli.common import model_options, open_runner, sampling_options, settings_from
from lvr_local.server.options import ServerOptions, check_address

# The server itself (FastAPI, uvicorn) is only imported when the command runs.
DEFAULTS = ServerOptions()


@click.command()
@click.option("--host", default=DEFAULTS.host, show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=DEFAULTS.port, show_default=True, type=click.IntRange(0, 65535), help="Port."
)
@click.option(
    "--api-key",
    envvar="LVR_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1/ (also read from $LVR_API_KEY).",
)
@click.option(
    "--max-queue",
    default=DEFAULTS.max_queue,
    show_default=True,
    type=click.IntRange(0, 10_000),
    help="Requests that may wait while one generates; more get 503 with Retry-After.",
)
@click.option(
    "--max-body",
    default=DEFAULTS.max_body,
    show_default=True,
    type=click.IntRange(1024),
    help="Largest request body, in bytes (413 above).",
)
@model_options
@sampling_options
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    api_key: str | None,
    max_queue: int,
    max_body: int,
    **kw: Any,
) -> None:
    """Serve the ensemble over HTTP with OpenAI's API until Ctrl-C or SIGTERM. The
    decoding options set each request's defaults; a request may override them."""
    from lvr_local.server.app import serve as run_server

    if api_key is not None and not api_key.strip():
        raise click.BadParameter(
            "the key is empty: give a key, or leave out --api-key to serve without one",
            param_hint="--api-key",
        )
    options = ServerOptions(host, port, api_key, max_queue, max_body)
    settings = settings_from(ctx, kw)
    check_address(host, port)
    with open_runner(ctx, kw, settings) as runner:
        stopped_by = run_server(runner, options)
    if stopped_by is not None:  # the models are closed: exit 130 or 143
        raise interrupts.Interrupted(stopped_by)
