"""The decoding commands: `lvr generate`, `lvr chat`, `lvr score`. They only present:
loading, settings and decoding are the runner's."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from lvr_local.cli.common import (
    echo_json,
    model_options,
    open_runner,
    sampling_options,
    settings_from,
)
from lvr_local.core.chat import Message
from lvr_local.errors import LvrError
from lvr_local.runner.run import Run, Runner


def read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def stream(run: Run, *, show: bool) -> None:
    """Print a run's text as it comes (when `show`); Ctrl-C ends it and keeps the text."""
    try:
        for chunk in run:
            if show and chunk.text:
                click.echo(chunk.text, nl=False)
    except KeyboardInterrupt:
        run.interrupt()
    if show:
        click.echo()


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
    settings = settings_from(ctx, kw)
    text = read_prompt(prompt)
    with open_runner(ctx, kw, settings) as runner:
        if chat:
            messages = [Message("system", system)] if system else []
            run = runner.chat([*messages, Message("user", text)])
        else:
            run = runner.complete(text.encode("utf-8"))
        try:
            stream(run, show=not as_json)
        except LvrError:
            # The text so far is kept: already printed, or in the record (with the error).
            if as_json:
                echo_json(run.record())
            else:
                click.echo()
            raise
        if as_json:
            echo_json(run.record())
        if run.stats.stop_reason == "interrupted":
            click.echo("[interrupted]", err=True)
            ctx.exit(130)


@click.command()
@model_options
@sampling_options
@click.option("--system", help="System message.")
@click.pass_context
def chat(ctx: click.Context, system: str | None, **kw: Any) -> None:
    """A conversation in the terminal. Commands: /reset /weights W.. /save FILE /quit."""
    settings = settings_from(ctx, kw)
    with open_runner(ctx, kw, settings) as runner:
        history: list[Message] = [Message("system", system)] if system else []
        click.echo("Type a message; /reset /weights W.. /save FILE /quit.", err=True)
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.Abort):
                click.echo()
                return
            if line.startswith("/"):
                if not chat_command(line, runner, history, system):
                    return
                continue
            if line.strip():
                chat_turn(runner, history, line)


def chat_turn(runner: Runner, history: list[Message], line: str) -> None:
    """One exchange; a failing turn is reported and the conversation goes on."""
    try:
        run = runner.chat([*history, Message("user", line)])
        stream(run, show=True)
    except LvrError as e:
        click.echo(f"[error: {e}]", err=True)
        return
    if run.stats.stop_reason == "interrupted":
        click.echo("[interrupted: reply kept]", err=True)
    history += [Message("user", line), Message("assistant", run.text)]


def chat_command(line: str, runner: Runner, history: list[Message], system: str | None) -> bool:
    """Handle a /command; False means leave the chat."""
    name, *args = line.split()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        history[:] = [Message("system", system)] if system else []
        click.echo("[conversation cleared]", err=True)
    elif name == "/weights":
        if args:
            try:
                runner.set_weights([float(a) for a in args])
            except (ValueError, LvrError) as e:
                click.echo(f"[{e}]", err=True)
        names = ", ".join(f"{m.name}={m.weight:g}" for m in runner.members)
        click.echo(f"[weights: {names}]", err=True)
    elif name == "/save" and args:
        save_history(history, Path(args[0]))
    else:
        click.echo("[commands: /reset, /weights W1 W2 .., /save FILE, /quit]", err=True)
    return True


def save_history(history: list[Message], path: Path) -> None:
    record = [{"role": m.role, "content": m.content} for m in history]
    try:
        path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        click.echo(f"[cannot save to {path}: {e.strerror or e}]", err=True)
        return
    click.echo(f"[saved {len(history)} messages to {path}]", err=True)


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
    data = file_.read_bytes() if file_ is not None else (text or "").encode("utf-8")
    if not data:
        raise click.UsageError("the text to score is empty")
    sub = kw.get("sub_vocab") or "bytes"
    if sub != "bytes":
        raise LvrError(
            f"lvr score works over bytes: with --sub-vocab {sub} a text is spelled by several "
            "piece sequences, and one spelling's probability is not the text's"
        )
    settings = settings_from(ctx, kw, sub_vocab="bytes")
    with open_runner(ctx, kw, settings) as runner:
        result = runner.score(data, prompt.encode("utf-8")).run()
    if as_json:
        echo_json(result)
        return
    print_score(result)


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
