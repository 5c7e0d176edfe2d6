"""The decoding commands: `lvr generate`, `lvr chat`, `lvr score`. They only present:
loading, settings and decoding are the runner's."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from lvr_local import interrupts, strict_json
from lvr_local.atomic import write_atomic
from lvr_local.cli.common import (
    echo_json,
    model_options,
    open_runner,
    sampling_options,
    settings_from,
)
from lvr_local.core.chat import Message
from lvr_local.core.combine import check_weights
from lvr_local.errors import LvrError
from lvr_local.runner.run import Run, Runner
from lvr_local.text import utf8_bytes, utf8_text


def read_prompt(prompt: str) -> str:
    """PROMPT, or stdin for '-', checked to be UTF-8 (the error names the first bad byte)."""
    if prompt == "-":
        return utf8_text(sys.stdin.buffer.read(), "the prompt read from stdin")
    utf8_bytes(prompt, "the prompt")
    return prompt


def stream(run: Run, *, show: bool) -> BaseException | None:
    """Print a run's text as it comes (when `show`). Ctrl-C, SIGTERM or a failure ends
    it and keeps the text; returns what ended it (None: the run finished)."""
    ended: BaseException | None = None
    try:
        for chunk in run:
            if show and chunk.text:
                click.echo(chunk.text, nl=False)
    except KeyboardInterrupt as e:
        run.interrupt()
        ended = e
    except LvrError as e:  # the run records it (stop reason "error")
        ended = e
    if show:
        click.echo()
    return ended


def failure_record(error: BaseException) -> dict[str, Any]:
    """The --json record of a run that ended before its first piece."""
    interrupted = isinstance(error, KeyboardInterrupt)
    return {
        "text": "",
        "pieces": 0,
        "bytes": 0,
        "stop_reason": "interrupted" if interrupted else "error",
        **({} if interrupted else {"error": str(error)}),
    }


@contextlib.contextmanager
def json_on_failure(as_json: bool) -> Iterator[None]:
    """With --json, a run that fails or is interrupted before it has a record of its own
    still prints one (then the error or interrupt goes on to set the exit status)."""
    try:
        yield
    except (LvrError, KeyboardInterrupt) as e:
        if as_json:
            echo_json(failure_record(e))
        raise


def finish(ctx: click.Context, run: Run, ended: BaseException | None, as_json: bool) -> None:
    """Print the record (--json), then exit as the run ended: 0, 1 (an error after the
    text so far) or 130/143 (interrupted)."""
    if as_json:
        echo_json(run.record())
    if isinstance(ended, KeyboardInterrupt):
        click.echo("[interrupted]", err=True)
        ctx.exit(interrupts.exit_status(ended))
    if ended is not None:
        raise click.ClickException(str(ended))


@click.command()
@click.argument("prompt")
@model_options
@sampling_options
@click.option(
    "--chat/--raw",
    default=True,
    help="Format PROMPT with each model's chat template (default), or use it as is.",
)
@click.option("--system", help="System message (chat mode).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record at the end.")
@click.pass_context
def generate(
    ctx: click.Context, prompt: str, chat: bool, system: str | None, as_json: bool, **kw: Any
) -> None:
    """Generate a continuation of PROMPT ('-' reads stdin) with the ensemble."""
    with json_on_failure(as_json):
        settings = settings_from(ctx, kw)
        text = read_prompt(prompt)
        with open_runner(ctx, kw, settings) as runner:
            if chat:
                messages = [Message("system", system)] if system else []
                run = runner.chat([*messages, Message("user", text)])
            else:
                run = runner.complete(text.encode("utf-8"))
            finish(ctx, run, stream(run, show=not as_json), as_json)


@click.command()
@model_options
@sampling_options
@click.option("--system", help="System message.")
@click.pass_context
def chat(ctx: click.Context, system: str | None, **kw: Any) -> None:
    """A conversation in the terminal. Commands: /reset /weights W.. /save FILE /quit."""
    settings = settings_from(ctx, kw)
    with open_runner(ctx, kw, settings) as runner:
        session = ChatSession(system)
        click.echo("Type a message; /reset /weights W.. /save FILE /quit.", err=True)
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.Abort) as e:
                click.echo()
                _leave_on_sigterm(e.__context__)
                return
            if line.startswith("/"):
                if not chat_command(line, runner, session):
                    return
                continue
            if line.strip():
                chat_turn(runner, session.history, line)


class ChatSession:
    """One conversation of `lvr chat`: its messages, and the files it saved them to
    (by inode, so that a file replaced since by someone else no longer counts)."""

    def __init__(self, system: str | None) -> None:
        self.system = system
        self.history: list[Message] = []
        self.written: set[tuple[int, int]] = set()
        self.reset()

    def reset(self) -> None:
        """A new conversation: no messages yet, and no file of its own."""
        self.history[:] = [Message("system", self.system)] if self.system else []
        self.written.clear()


def _leave_on_sigterm(error: BaseException | None) -> None:
    """Ctrl-C only ends a turn; SIGTERM ends the session (exit 143)."""
    if isinstance(error, interrupts.Interrupted) and error.signum == signal.SIGTERM:
        raise error


def chat_turn(runner: Runner, history: list[Message], line: str) -> None:
    """One exchange. Whatever fails in it (a message that is not UTF-8, a conversation
    longer than the context, weights the rule refuses) is reported and the conversation
    goes on; an interrupted or failed reply keeps the text it had."""
    try:
        run = runner.chat([*history, Message("user", line)])
    except KeyboardInterrupt as e:
        _leave_on_sigterm(e)
        click.echo("[interrupted]", err=True)
        return
    except Exception as e:  # any failed turn is reported; the conversation is kept
        click.echo(f"[error: {e}]", err=True)
        return
    ended = stream(run, show=True)
    history += [Message("user", line), Message("assistant", run.text)]
    if isinstance(ended, KeyboardInterrupt):
        click.echo("[interrupted: reply kept]", err=True)
        _leave_on_sigterm(ended)
    elif ended is not None:
        click.echo(f"[error: {ended}; the reply so far is kept]", err=True)


CHAT_COMMANDS = "[commands: /reset, /weights W1 W2 .., /save FILE [--force], /quit]"


def chat_command(line: str, runner: Runner, session: ChatSession) -> bool:
    """Handle a /command; False means leave the chat."""
    name, *args = line.split()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        click.echo("[conversation cleared]", err=True)
    elif name == "/weights":
        if args:
            set_weights(runner, args)
        names = ", ".join(f"{m.name}={m.weight:g}" for m in runner.members)
        click.echo(f"[weights: {names}]", err=True)
    elif name == "/save" and len([a for a in args if a != "--force"]) == 1:
        force = "--force" in args
        save_history(session, Path(next(a for a in args if a != "--force")), force=force)
    else:
        click.echo(CHAT_COMMANDS, err=True)
    return True


def set_weights(runner: Runner, args: list[str]) -> None:
    """/weights: checked against the combination rule now, not at every turn after."""
    try:
        weights = [float(a) for a in args]
        check_weights(runner.settings.for_mode("chat").combine or "", weights)
        runner.set_weights(weights)
    except ValueError:
        click.echo(f"[weights must be numbers, got {' '.join(args)}; unchanged]", err=True)
    except LvrError as e:
        click.echo(f"[{e}; weights unchanged]", err=True)


def save_history(session: ChatSession, path: Path, force: bool = False) -> None:
    """/save: the conversation as a JSON list of messages, written whole or not at all.
    A file this conversation did not write is only replaced with --force."""
    existing = _identity(path)
    if existing is not None and existing not in session.written and not force:
        click.echo(
            f"[not saved: {path} exists and this conversation did not write it; "
            f"/save {path} --force replaces it]",
            err=True,
        )
        return
    record = [{"role": m.role, "content": m.content} for m in session.history]
    try:
        write_atomic(path, strict_json.dumps(record, indent=2) + "\n")
    except OSError as e:
        kept = f"{path} is unchanged" if existing is not None else "nothing was written"
        click.echo(f"[cannot save to {path}: {e.strerror or e}; {kept}]", err=True)
        return
    identity = _identity(path)
    if identity is not None:
        session.written.add(identity)
    click.echo(f"[saved {len(session.history)} messages to {path}]", err=True)


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at `path` (device, inode), or None when there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


@click.command()
@click.option("--text", help="The text to score.")
@click.option(
    "--file",
    "file_",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A UTF-8 file whose content is scored.",
)
@click.option("--prompt", default="", help="Condition on this text first (raw, no template).")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
@click.pass_context
def score(
    ctx: click.Context, text: str | None, file_: Path | None, prompt: str, as_json: bool, **kw: Any
) -> None:
    """Exact log-probability and bits per byte of a text, per model and for the ensemble."""
    if (text is None) == (file_ is None):
        raise click.UsageError("give exactly one of --text or --file")
    data = _score_text(text, file_)
    condition = utf8_bytes(prompt, "--prompt")
    if not data:
        raise click.UsageError("the text to score is empty")
    sub = kw.get("sub_vocab") or "bytes"
    if sub != "bytes":
        raise LvrError(
            f"lvr score works over bytes: with --sub-vocab {sub} a text is spelled by several "
            "piece sequences, and one spelling's probability is not the text's"
        )
    settings = settings_from(ctx, kw, sub_vocab="bytes")
    with json_on_failure(as_json), open_runner(ctx, kw, settings) as runner:
        result = runner.score(data, condition).run()
    if as_json:
        echo_json(result)
        return
    print_score(result)


def _score_text(text: str | None, file_: Path | None) -> bytes:
    """The text to score as UTF-8 bytes: --text, or the content of --file."""
    if file_ is None:
        return utf8_bytes(text or "", "--text")
    try:
        data = file_.read_bytes()
    except OSError as e:
        raise LvrError(f"cannot read {file_}: {e.strerror or e}") from e
    utf8_text(data, str(file_))
    return data


def print_score(result: dict[str, Any]) -> None:
    click.echo(f"{result['n_bytes']} bytes")
    for name, r in result["models"].items():
        click.echo(
            f"{name:>20}: logprob {r['logprob']:.4f} nats, "
            f"{r['bits_per_byte']:.4f} bits/byte (pruned mass {r['pruned_mass']:.2e})"
        )
    if "ensemble" in result:
        e = result["ensemble"]
        click.echo(
            f"{'ensemble':>20}: logprob {e['logprob']:.4f} nats, {e['bits_per_byte']:.4f} bits/byte"
        )
