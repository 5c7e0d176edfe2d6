"""The decoding commands: `lvr generate`, `lvr chat`, `lvr score`.

They only present: loading, stepping and scoring live in ensemble.py and scoring.py.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from lvr_local.chat import Message
from lvr_local.cli_common import echo_json, get_config, model_specs
from lvr_local.config import COMBINE_RULES, Defaults, with_overrides
from lvr_local.ensemble import Ensemble, Member, RunStats, load_member
from lvr_local.errors import LvrError
from lvr_local.reduction import EngineOptions
from lvr_local.sampling import Sampler, SamplingParams


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """-m/--weight/--sub-vocab/--combine/--prune, shared by every decoding command."""
    options = [
        click.option(
            "-m",
            "--model",
            "models",
            multiple=True,
            metavar="NAME|PATH",
            help="A model from models.toml or a .gguf file; repeat for an ensemble "
            "(default: the enabled models of models.toml).",
        ),
        click.option(
            "--weight",
            "weights",
            multiple=True,
            type=float,
            help="Weight of each model, in -m order (negative allowed with product).",
        ),
        click.option("--sub-vocab", help="mcv | bytes | maxlen:K (default from models.toml)."),
        click.option(
            "--combine",
            type=click.Choice(COMBINE_RULES),
            help="How the models' distributions are combined.",
        ),
        click.option(
            "--prune", type=float, help="Drop tokenization branches below this share of the total."
        ),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), func)


def sampling_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--temperature", "-t", type=float, help="0 = greedy (default)."),
        click.option("--top-k", type=int, help="Keep the k most likely pieces (0 = off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold."),
        click.option("--min-p", type=float, help="Drop pieces below min-p x the top one."),
        click.option("--seed", type=int, help="Random seed, for reproducible sampling."),
        click.option("--max-pieces", type=int, help="Stop after this many pieces."),
        click.option("--max-bytes", type=int, help="Stop after this many bytes."),
        click.option("--stop", multiple=True, help="Stop where this string appears (repeat)."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(options), func)


def settings_from(ctx: click.Context, kw: dict[str, Any]) -> Defaults:
    keys = (
        "sub_vocab",
        "combine",
        "prune",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "seed",
        "max_pieces",
    )
    return with_overrides(get_config(ctx).defaults, **{k: kw.get(k) for k in keys})


def sampler_from(settings: Defaults) -> Sampler:
    return Sampler(
        SamplingParams(
            settings.temperature, settings.top_k, settings.top_p, settings.min_p, settings.seed
        )
    )


@contextlib.contextmanager
def open_ensemble(
    ctx: click.Context, kw: dict[str, Any], settings: Defaults, *, sub_vocab: str | None = None
) -> Iterator[Ensemble]:
    """Load the models (progress on stderr), build the ensemble, and always free them."""
    specs = model_specs(ctx, kw["models"], kw["weights"])
    members: list[Member] = []
    ensemble: Ensemble | None = None
    try:
        for spec in specs:
            click.echo(f"loading {spec.name} ...", err=True, nl=False)
            t0 = time.perf_counter()
            members.append(load_member(spec, settings))
            click.echo(f" {time.perf_counter() - t0:.1f} s", err=True)
        ensemble = Ensemble(
            members,
            sub_vocab=sub_vocab or settings.sub_vocab,
            rule=settings.combine,
            options=EngineOptions(prune=settings.prune),
        )
        yield ensemble
    finally:
        if ensemble is not None:
            ensemble.close()
        for m in members:
            m.close()


def read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


class Streamer:
    """Writes pieces as text as they come; UTF-8 characters split across pieces wait."""

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> None:
        text = self.decoder.decode(data)
        if text:
            self.out.write(text)
            self.out.flush()

    def finish(self) -> None:
        self.out.write(self.decoder.decode(b"", final=True))
        self.out.flush()


def run_generation(
    ensemble: Ensemble, settings: Defaults, kw: dict[str, Any], on_piece: Callable[[bytes], None]
) -> tuple[bytes, RunStats]:
    """Generate until a stop; Ctrl-C ends it cleanly and keeps the text made so far."""
    stats = RunStats()
    text = b""
    events = ensemble.generate(
        sampler_from(settings),
        max_pieces=settings.max_pieces,
        max_bytes=kw.get("max_bytes"),
        stop=kw.get("stop", ()),
        stats=stats,
    )
    try:
        for event in events:
            text += event.text
            on_piece(event.text)
    except KeyboardInterrupt:
        events.close()
        stats.stop_reason = "interrupted"
    return text, stats


def run_record(ensemble: Ensemble, text: bytes, stats: RunStats) -> dict[str, Any]:
    return {
        "text": text.decode("utf-8", errors="replace"),
        "pieces": stats.pieces,
        "bytes": len(text),
        "seconds": round(stats.seconds, 3),
        "stop_reason": stats.stop_reason,
        "sub_vocab": ensemble.sub.describe(),
        "combine": ensemble.rule,
        "models_at_once": ensemble.concurrent,
        "models": [
            {
                "name": m.name,
                "weight": m.weight,
                "n_threads": m.backend.n_threads,
                **vars(m.backend.counters),
            }
            for m in ensemble.members
        ],
    }


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
    with open_ensemble(ctx, kw, settings) as ensemble:
        if chat:
            messages = [Message("system", system)] if system else []
            ensemble.start_chat([*messages, Message("user", text)])
        else:
            ensemble.start_raw(text.encode("utf-8"))
        streamer = Streamer()
        out, stats = run_generation(
            ensemble, settings, kw, (lambda b: None) if as_json else streamer.write
        )
        if as_json:
            echo_json(run_record(ensemble, out, stats))
        else:
            streamer.finish()
            click.echo()
        if stats.stop_reason == "interrupted":
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
    with open_ensemble(ctx, kw, settings) as ensemble:
        history: list[Message] = [Message("system", system)] if system else []
        click.echo("Type a message; /reset /weights W.. /save FILE /quit.", err=True)
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.Abort):
                click.echo()
                return
            if line.startswith("/"):
                if not chat_command(line, ensemble, history, system):
                    return
                continue
            if not line.strip():
                continue
            history.append(Message("user", line))
            ensemble.start_chat(history)
            streamer = Streamer()
            reply, stats = run_generation(ensemble, settings, kw, streamer.write)
            streamer.finish()
            click.echo()
            if stats.stop_reason == "interrupted":
                click.echo("[interrupted: reply kept]", err=True)
            history.append(Message("assistant", reply.decode("utf-8", errors="replace")))


def chat_command(line: str, ensemble: Ensemble, history: list[Message], system: str | None) -> bool:
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
                ensemble.set_weights([float(a) for a in args])
            except (ValueError, LvrError) as e:
                click.echo(f"[{e}]", err=True)
        names = ", ".join(f"{m.name}={m.weight:g}" for m in ensemble.members)
        click.echo(f"[weights: {names}]", err=True)
    elif name == "/save" and args:
        record = [{"role": m.role, "content": m.content} for m in history]
        Path(args[0]).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        click.echo(f"[saved {len(history)} messages to {args[0]}]", err=True)
    else:
        click.echo("[commands: /reset, /weights W1 W2 .., /save FILE, /quit]", err=True)
    return True


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
    from lvr_local.scoring import score_text

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
    settings = settings_from(ctx, {**kw, "sub_vocab": "bytes"})
    with open_ensemble(ctx, kw, settings, sub_vocab="bytes") as ensemble:
        result = score_text(ensemble, data, prompt.encode("utf-8"))
    if as_json:
        echo_json(result)
        return
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


@click.command()
@click.option("--steps", default=128, show_default=True, help="Greedy steps per decoder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(steps: int, as_json: bool) -> None:
    """Speeds of the bundled pair, side by side in one run: native tokens/s of each model,
    ensemble pieces/s and bytes/s over the MCV and over bytes, forward passes per piece."""
    from lvr_local.benchmarks import ensemble_bench, print_ensemble_report

    report = ensemble_bench(steps)
    if as_json:
        echo_json(report)
    else:
        print_ensemble_report(report)
