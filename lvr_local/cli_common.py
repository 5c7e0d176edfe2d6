"""Helpers shared by the CLI's command modules: config, MODEL arguments, output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from lvr_local.config import Config, load_config
from lvr_local.errors import LvrError
from lvr_local.vocabulary import Vocabulary, load_vocabulary


def get_config(ctx: click.Context) -> Config:
    if "config" not in ctx.obj:
        ctx.obj["config"] = load_config(ctx.obj["config_path"])
    return ctx.obj["config"]


def resolve_model(ctx: click.Context, ref: str) -> tuple[str, Path]:
    """A MODEL argument: a name from models.toml, or a path to a .gguf file."""
    config = get_config(ctx)
    spec = config.model(ref)
    if spec is not None:
        return spec.name, spec.resolve_path()
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        return path.stem, path
    names = ", ".join(m.name for m in config.models) or "none"
    raise LvrError(
        f"unknown model '{ref}': not a name in {config.path} ({names}) and not a .gguf file"
    )


def load_vocab(ctx: click.Context, ref: str) -> Vocabulary:
    name, path = resolve_model(ctx, ref)
    return load_vocabulary(path, name=name)


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def model_specs(ctx: click.Context, refs: Sequence[str], weights: Sequence[float]) -> list:
    """The models a decoding command runs: `-m` names or paths, else the enabled models
    of models.toml; `--weight`s in the same order override the file's weights."""
    from dataclasses import replace

    from lvr_local.config import ModelSpec

    config = get_config(ctx)
    specs: list[ModelSpec] = []
    for ref in refs:
        spec = config.model(ref)
        if spec is None:
            name, path = resolve_model(ctx, ref)
            d = config.defaults
            spec = ModelSpec(
                name=name, source=str(path), n_ctx=d.n_ctx, n_gpu_layers=d.n_gpu_layers
            )
        specs.append(replace(spec, enabled=True))
    if not refs:
        specs = list(config.enabled_models)
    if not specs:
        raise LvrError(f"no model to run: {config.path} enables none and no -m was given")
    if weights:
        if len(weights) != len(specs):
            raise LvrError(f"{len(weights)} --weight values for {len(specs)} models")
        specs = [replace(s, weight=w) for s, w in zip(specs, weights, strict=True)]
    return specs
