"""The `lvr` command line: one click group; commands only present, the library works.

Every user mistake (bad models.toml, missing or corrupt GGUF, unsupported tokenizer,
bad flag value) reaches the user as one 'Error: ...' line and exit status 1 (2 for a
usage error). A bug (InternalError, or any other exception) is one line too, naming the
log file that holds its traceback. Ctrl-C anywhere exits with 130, SIGTERM with 143,
after printing what was produced (lvr_local/interrupts.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any

import click

from lvr_local import __version__, crash_report, interrupts
from lvr_local.cli.bench import bench
from lvr_local.cli.decode import chat, generate, score
from lvr_local.cli.doctor import doctor
from lvr_local.cli.eval import eval_command
from lvr_local.cli.inspect import common, models, paths, settings, vocab
from lvr_local.cli.lmeval import lm_eval_command
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


_COMMANDS = (models, vocab, common, pair, paths, settings, doctor)
_COMMANDS += (generate, chat, score, eval_command, lm_eval_command, serve)
for _command in (*_COMMANDS, bench, tui, rpc_server, rpc_build):
    cli.add_command(_command)


def main() -> None:
    interrupts.install()
    crash_report.install()  # a fatal signal in llama.cpp: the stack in llama.log
    status = run_cli()
    try:
        sys.stdout.flush()
    except OSError as e:  # the output's last bytes could not be written either
        status = _environment_error(e)
    sys.exit(status)


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
    except OSError as e:
        return _environment_error(e)
    except Exception as e:  # a bug, InternalError among them
        return _internal_error(e, sys.argv[1:] if args is None else args)
    return result if isinstance(result, int) else 0


def _internal_error(error: Exception, args: list[str]) -> int:
    """A bug: its traceback is appended to the error log, and the terminal gets one line
    that names the log (or, when the log cannot be written, the traceback itself)."""
    import traceback
    from datetime import UTC, datetime

    from lvr_local.paths import error_log

    text = "".join(traceback.format_exception(error))
    try:
        path = error_log()
        with path.open("a", encoding="utf-8") as log:
            log.write(f"{datetime.now(UTC).isoformat()} lvr {' '.join(args)}\n{text}\n")
        where = f"the traceback is in {path}"
    except (OSError, LvrError):
        click.echo(text, err=True, nl=False)
        where = "the traceback is above"
    summary = (str(error).splitlines() or [""])[0]
    click.echo(
        f"Error: internal error ({type(error).__name__}: {summary}), a bug of lvr-local; {where}",
        err=True,
    )
    return 1


def _environment_error(error: OSError) -> int:
    """What the system refused, a full disk or a closed pipe most often (`lvr generate
    hi > /dev/full`): one Error: line, exit 1. An error with no file name is a write to
    the output; what is left of it is dropped, so that the interpreter's own flush at
    exit does not fail again."""
    reason = error.strerror or str(error)
    if error.filename is not None:
        message = f"{error.filename}: {reason}"
    elif error.errno in OUTPUT_ERRORS:
        message = f"cannot write the output: {reason}"
        _drop_output()
    else:
        message = reason
    with contextlib.suppress(OSError):
        click.echo(f"Error: {message}", err=True)
    return 1


# Errors of a write: a full disk, a quota, a closed pipe, an I/O error, a file too big.
OUTPUT_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EPIPE, errno.EIO, errno.EFBIG}


def _drop_output() -> None:
    """Point stdout at /dev/null, discarding what it still holds."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _interrupted(error: KeyboardInterrupt) -> int:
    click.echo("\n[interrupted]", err=True)
    return interrupts.exit_status(error)


if __name__ == "__main__":
    main()
