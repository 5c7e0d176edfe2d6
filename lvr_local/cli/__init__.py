"""The `lvr` command line: one click group; commands only present, the library works.

Every user mistake (bad models.toml, missing or corrupt GGUF, unsupported tokenizer,
bad flag value) reaches the user as one 'Error: ...' line and exit status 1 (2 for a
usage error). Ctrl-C anywhere exits with 130, SIGTERM with 143, after printing what
was produced (lvr_local/interrupts.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from lvr_local import __version__, interrupts
from lvr_local.cli.bench import bench
from lvr_local.cli.decode import chat, generate, score
from lvr_local.cli.eval import eval_command
from lvr_local.cli.inspect import common, models, paths, settings, vocab
from lvr_local.cli.pair import pair
from lvr_local.cli.rpc import rpc_build, rpc_server
from lvr_local.cli.serve import serve
from lvr_local.cli.tui import tui
from lvr_local.errors import LvrError
from lvr_local.llama.native import set_verbose


class LvrGroup(click.Group):
    """Turns LvrError into click's clean 'Error: ...' exit instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LvrError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=LvrGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lvr")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="models.toml to use (default: $LVR_CONFIG, the user directory's, or the shipped one).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also print llama.cpp's own log on stderr (it always goes to llama.log in the "
    "user directory).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: bool) -> None:
    """Run several local GGUF models together over their common vocabulary."""
    ctx.obj = {"config_path": config_path}
    set_verbose(verbose)


_COMMANDS = (
    models,
    vocab,
    common,
    pair,
    paths,
    settings,
    generate,
    chat,
    score,
    eval_command,
    serve,
)
for _command in (*_COMMANDS, bench, tui, rpc_server, rpc_build):
    cli.add_command(_command)


def main() -> None:
    interrupts.install()
    sys.exit(run_cli())


def run_cli(args: list[str] | None = None) -> int:
    """Run the command line and return its exit status: click's own handling, except
    that an interrupt is never click's "Aborted!" (exit 1) but 130 or 143."""
    try:
        interrupts.started()
        result = cli.main(args, prog_name="lvr", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, KeyboardInterrupt):
            return _interrupted(cause)
        click.echo("Aborted!", err=True)
        return 1
    except KeyboardInterrupt as e:
        return _interrupted(e)
    return result if isinstance(result, int) else 0


def _interrupted(error: KeyboardInterrupt) -> int:
    click.echo("\n[interrupted]", err=True)
    return interrupts.exit_status(error)


if __name__ == "__main__":
    main()
