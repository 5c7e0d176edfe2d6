"""`lvr models --found`: the GGUF models Ollama, the Hugging Face cache, LM Studio, GPT4All
and Jan keep on this machine, by the names `-m` and models.toml accept."""

from __future__ import annotations

import time

import click

from lvr_local.cli.common import echo_json, size_text, table
from lvr_local.llama.vocab_reader import SUPPORTED_TOKENIZERS
from lvr_local.runner.discovery import FoundModel, find_models
from lvr_local.runner.stores import store_roots


def show_found(as_json: bool) -> None:
    started = time.perf_counter()
    found = find_models()
    seconds = time.perf_counter() - started
    if as_json:
        echo_json({"stores": _store_roots(), "models": [m.as_record() for m in found]})
        return
    for store, roots in _store_roots().items():
        click.echo(f"{store}: {', '.join(roots)}")
    if not found:
        click.echo("no GGUF model found in these folders")
        return
    headers = ("NAME", "SIZE", "ARCH", "PARAMS", "QUANT", "TOKENIZER", "ROLE", "ALSO")
    click.echo(table(headers, [_row(m) for m in found if m.summary]))
    for m in found:  # never silent: why a file is not listed as usable
        if not m.summary:
            click.echo(f"{m.names[0]}: {m.problem}", err=True)
    usable = sum(1 for m in found if m.summary)
    click.echo(f"{usable} models, {len(found) - usable} unusable, listed in {seconds:.2f} s")


def _store_roots() -> dict[str, list[str]]:
    return {store: [str(r) for r in roots] for store, roots in store_roots().items()}


def _row(m: FoundModel) -> tuple[object, ...]:
    s = m.summary
    assert s is not None
    tokenizer = f"{s.tokenizer_model}/{s.tokenizer_pre or '-'}"
    if s.tokenizer_model not in SUPPORTED_TOKENIZERS:
        tokenizer += " (unsupported)"
    return (
        m.names[0],
        size_text(m.size),
        s.architecture,
        parameter_text(s.parameters),
        s.quantization,
        tokenizer,
        m.role,
        ", ".join(m.names[1:]),
    )


def parameter_text(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
