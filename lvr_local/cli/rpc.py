"""`lvr rpc-server` and `lvr rpc-build`: the other machine's side of remote members.

The server is llama.cpp's own RPC server (ggml_backend_rpc_start_server), started from
the same install, so that the other machine needs nothing else.
"""

from __future__ import annotations

import signal
from pathlib import Path

import click

from lvr_local.errors import LvrError
from lvr_local.llama.rpc import module_path, parse_endpoint, rpc_backend, serve
from lvr_local.llama.rpc_build import build_rpc_module
from lvr_local.machine import physical_cores
from lvr_local.paths import cache_dir

WARNING = (
    "The RPC protocol has no authentication and no encryption: anyone who can reach "
    "this port can run computations here and read what is sent. Serve on a trusted "
    "network only."
)


@click.command("rpc-server")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 for every interface (a trusted network only).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    help="CPU threads for the layers computed here (default: the physical cores).",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep received weights in this directory, so that the next load of the same "
    "model sends hashes instead of tensors larger than 10 MB.",
)
def rpc_server(host: str, port: int, threads: int | None, cache: Path | None) -> None:
    """Serve this machine's CPU or GPUs to other machines' lvr, through llama.cpp's RPC
    backend (models.toml there: rpc = ["THIS-HOST:PORT"]). Runs until Ctrl-C."""
    endpoint = parse_endpoint(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LvrError(f"cannot create the --cache folder {cache}: {e.strerror or e}") from e
    origin = rpc_backend().origin  # a build without RPC: the error, before any warning
    click.echo(f"lvr rpc-server on {endpoint} (RPC backend: {origin}). {WARNING}", err=True)
    # The server blocks in C, where Python's signal handlers never run: let Ctrl-C and
    # SIGTERM end the process the default way.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    serve(endpoint, threads=threads or physical_cores(), cache=cache)


@click.command("rpc-build")
@click.option(
    "--sdist",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The llama-cpp-python source archive of the installed version (default: "
    "downloaded with pip).",
)
def rpc_build(sdist: Path | None) -> None:
    """Compile llama.cpp's RPC backend alone, for a llama-cpp-python built without it
    (seconds, instead of rebuilding llama.cpp). Needs a C++ compiler."""
    target = module_path()
    seconds = build_rpc_module(target, sdist=sdist, downloads=cache_dir("sdist"))
    click.echo(f"compiled in {seconds:.1f} s: {target}")
    click.echo("lvr finds it there; elsewhere, point $LVR_GGML_RPC at it.")
