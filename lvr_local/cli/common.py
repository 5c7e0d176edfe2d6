"""What the CLI's commands share: the config, MODEL arguments, the decoding options that
become run settings, the runner's lifetime, and output helpers."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from lvr_local import strict_json
from lvr_local.core.combine import RULES
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.decoding.ensemble import METHODS
from lvr_local.errors import LvrError
from lvr_local.llama.extra_buffers import SETTINGS as EXTRA_BUFFERS
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.runner.config import Config, ModelSpec, check_weights, load_config
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import (
    NUMERICS,
    PRECISIONS,
    SAMPLE_ON,
    RunSettings,
    with_overrides,
)
from lvr_local.runner.sources import resolve_source
from lvr_local.runner.stores import is_store_name

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def get_config(ctx: click.Context) -> Config:
    obj = ctx.find_root().obj
    if "config" not in obj:
        obj["config"] = load_config(obj["config_path"])
    return obj["config"]


def resolve_model(ctx: click.Context, ref: str) -> tuple[str, Path]:
    """A MODEL argument: a name from models.toml, a store name (`ollama:llama3.2:1b`,
    `hf:ORG/REPO`, `lmstudio:PUBLISHER/MODEL`, `gpt4all:FILE`, `jan:ID`; `lvr models
    --found` lists them), or a path to a .gguf file."""
    config = get_config(ctx)
    spec = config.model(ref)
    if spec is not None:
        return spec.name, spec.resolve_path()
    if is_store_name(ref):
        return ref, resolve_source(ref)
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        return path.stem, path
    names = ", ".join(m.name for m in config.models) or "none"
    raise LvrError(
        f"unknown model '{ref}': not a name in {config.path} ({names}), not a store name "
        "(ollama:, hf:, lmstudio:, gpt4all:, jan:) and not a .gguf file"
    )


def load_vocab(ctx: click.Context, ref: str) -> Vocabulary:
    name, path = resolve_model(ctx, ref)
    return load_vocabulary(path, name=name)


def model_specs(
    ctx: click.Context, refs: Sequence[str], weights: Sequence[float]
) -> list[ModelSpec]:
    """The models a decoding command runs: `-m` names or paths, else the enabled models
    of models.toml; `--weight`s in the same order override the file's weights."""
    config = get_config(ctx)
    specs: list[ModelSpec] = []
    for ref in refs:
        spec = config.model(ref)
        if spec is None:
            name, path = resolve_model(ctx, ref)
            spec = ModelSpec(name=name, source=str(path))
        specs.append(replace(spec, enabled=True))
    if not refs:
        specs = list(config.enabled_models)
    if not specs:
        raise LvrError(f"no model to run: {config.path} enables none and no -m was given")
    if weights:
        check_weights(weights, len(specs), "--weight")
        specs = [replace(s, weight=w) for s, w in zip(specs, weights, strict=True)]
    return specs


# ----------------------------------------------------------------- decoding options


def _options(options: list[Decorator]) -> Decorator:
    return lambda func: functools.reduce(lambda f, opt: opt(f), reversed(options), func)


model_options = _options(
    [
        click.option(
            "-m",
            "--model",
            "models",
            multiple=True,
            metavar="NAME|PATH",
            help="A model from models.toml, a .gguf file, or a model of Ollama, the "
            "Hugging Face cache, LM Studio, GPT4All or Jan (ollama:NAME, hf:ORG/REPO, "
            "lmstudio:PUB/MODEL, gpt4all:FILE, jan:ID; see lvr models --found); repeat for "
            "an ensemble (default: the enabled models of models.toml).",
        ),
        click.option(
            "--weight",
            "weights",
            multiple=True,
            type=float,
            help="Weight of each model, in -m order (negative allowed with product).",
        ),
        click.option(
            "--sub-vocab",
            help="auto | mcv | bytes | maxlen:K (default from models.toml; auto: bytes for "
            "an ensemble, one model's own vocabulary alone).",
        ),
        click.option(
            "--method",
            type=click.Choice(METHODS),
            help="How a model's tokens become pieces: lossless reduction, or the naive "
            "restriction baseline.",
        ),
        click.option(
            "--combine",
            type=click.Choice(RULES),
            help="How the models' distributions combine (bayes: weights follow each model's "
            "probability of the text so far).",
        ),
        click.option(
            "--calibrate/--no-calibrate",
            default=None,
            help="product: scale the exponents so the positive weights sum to 1 (default), "
            "or use the weights as given (sharper).",
        ),
        click.option(
            "--switch-rate",
            type=float,
            help="bayes: share this fraction of the weight out again after every piece "
            "(fixed share; 0 = plain Bayes).",
        ),
        click.option(
            "--defer",
            type=float,
            help="Scale each base model's weight by (1 - the surest chat model's top "
            "probability) ** DEFER at every piece (0 = off; default 5 in raw completion, "
            "0 in a conversation and when scoring).",
        ),
        click.option(
            "--prune",
            type=float,
            help="Generation: drop tokenization branches below this share of the total.",
        ),
        click.option(
            "--fresh-prune",
            type=float,
            help="Generation: drop a new branch (one that needs a forward pass) below this "
            "share of the total.",
        ),
        click.option(
            "--text-prune",
            type=float,
            help="Known text (scoring, prompt tails): the same, over the mass that can still "
            "spell the text.",
        ),
        click.option(
            "--max-branches",
            type=int,
            help="Keep at most this many tokenization branches per model (0 = no cap).",
        ),
        click.option(
            "--numerics",
            type=click.Choice(NUMERICS),
            help="llama.cpp's arithmetic: exact (every token alone, results independent of "
            "batching and cache state), fast (batched), auto (exact for scoring, fast for "
            "generation).",
        ),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            help="The engine's exp over each model's vocabulary: float32 (the default, "
            "faster) or float64 (the last ~1e-7 nats of a score).",
        ),
        click.option(
            "--extra-buffers",
            type=click.Choice(EXTRA_BUFFERS),
            help="llama.cpp's repacked weight layouts (AMX, CPU_REPACK): auto = where a probe "
            "decode on this machine found them safe (they fault on some AMX Xeons).",
        ),
        click.option(
            "--token-top-k",
            type=int,
            help="K-LVR: keep only the K most likely tokens of each branch (0 = all).",
        ),
    ]
)

sampling_options = _options(
    [
        click.option("--temperature", "-t", type=float, help="0 = greedy."),
        click.option("--greedy", is_flag=True, help="Always take the likeliest piece (-t 0)."),
        click.option("--top-k", type=int, help="Keep the k most likely candidates (0 = off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold."),
        click.option("--min-p", type=float, help="Drop candidates below min-p x the top one."),
        click.option("--seed", type=int, help="Random seed, for reproducible sampling."),
        click.option(
            "--sample-on",
            type=click.Choice(SAMPLE_ON),
            help="Where temperature, top-k, top-p, min-p and the penalties act: on each "
            "model's own tokens, as llama.cpp samples it alone (default), or on the "
            "combined pieces.",
        ),
        click.option(
            "--repeat-penalty", type=float, help="Penalise pieces of the recent window (1 = off)."
        ),
        click.option(
            "--repeat-last-n", type=int, help="Window of the penalties (-1 = the whole reply)."
        ),
        click.option("--presence-penalty", type=float, help="Subtract this once per seen piece."),
        click.option("--frequency-penalty", type=float, help="Subtract this per occurrence."),
        click.option("--dry-multiplier", type=float, help="DRY penalty strength (0 = off)."),
        click.option("--dry-base", type=float, help="DRY growth per extra repeated piece."),
        click.option("--dry-allowed-length", type=int, help="Repeats this long are free."),
        click.option("--dry-penalty-last-n", type=int, help="DRY window (-1 = the whole reply)."),
        click.option(
            "--dry-sequence-breakers",
            multiple=True,
            help='A string that DRY does not look across (repeat; default: newline, :, ", *).',
        ),
        click.option("--max-pieces", type=int, help="Stop after this many pieces."),
        click.option("--max-bytes", type=int, help="Stop after this many bytes."),
        click.option("--stop", multiple=True, help="Stop where this string appears (repeat)."),
    ]
)

# Flags that are run settings, by their settings name (click's parameter names).
SETTING_FLAGS = (
    "extra_buffers",
    "numerics",
    "precision",
    "sub_vocab",
    "method",
    "combine",
    "calibrate",
    "switch_rate",
    "defer",
    "prune",
    "fresh_prune",
    "text_prune",
    "max_branches",
    "token_top_k",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "sample_on",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "max_pieces",
    "max_bytes",
    "stop",
)


def settings_from(ctx: click.Context, kw: dict[str, Any], **fixed: Any) -> RunSettings:
    """models.toml's defaults, then the flags given, then what the command fixes."""
    flags = {k: kw.get(k) for k in SETTING_FLAGS}
    for key in ("stop", "dry_sequence_breakers"):  # click gives () when not given
        flags[key] = tuple(kw.get(key) or ()) or None
    if kw.get("greedy"):
        if kw.get("temperature") not in (None, 0):
            raise LvrError("--greedy and --temperature contradict each other: give one")
        flags["temperature"] = 0.0
    return with_overrides(get_config(ctx).defaults, **{**flags, **fixed})


@contextlib.contextmanager
def open_runner(
    ctx: click.Context, kw: dict[str, Any], settings: RunSettings, **runner_options: Any
) -> Iterator[Runner]:
    """Load the models (progress on stderr) and always free them. A step that fails
    ends its progress line, so that the error starts a line of its own."""
    runner = Runner(model_specs(ctx, kw["models"], kw["weights"]), settings, **runner_options)
    started = [time.perf_counter()]
    mid_line = [False]

    def progress(label: str, done: int, total: int) -> None:
        if done:
            click.echo(f" {time.perf_counter() - started[0]:.1f} s", err=True)
        if done < total:
            click.echo(f"{label} ...", err=True, nl=False)
        mid_line[0] = done < total
        started[0] = time.perf_counter()

    try:
        try:
            loaded = runner.load(progress)
        except Exception:
            if mid_line[0]:
                click.echo(" failed", err=True)
            raise
        yield loaded
    finally:
        runner.close()


# ----------------------------------------------------------------- output


def echo_json(data: object) -> None:
    """Every --json output: strict JSON, NaN and infinities written as null."""
    click.echo(strict_json.dumps(data, indent=2))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"
