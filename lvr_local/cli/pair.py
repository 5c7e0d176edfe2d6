"""`lvr pair A B [C ...]`: do these models go together, and do they fit? Answered from
their vocabularies and GGUF headers, before any weights are loaded."""

from __future__ import annotations

from dataclasses import asdict, replace

import click

from lvr_local.cli.common import echo_json, get_config, model_specs, table
from lvr_local.core.subvocab import common_report
from lvr_local.core.vocabulary import Vocabulary
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.runner.loading import memory_plan
from lvr_local.runner.memory_check import (
    GPU,
    NO_GPU,
    RPC,
    MemberMemory,
    MemoryPlan,
    check_memory,
    gib,
)
from lvr_local.runner.settings import with_overrides

SPLIT_WARNING = (
    "the members cut text into tokens differently ({labels}): where their token "
    "boundaries differ, the piece-by-piece rules (mean, product) can lock into one "
    "member's spelling; bayes, or the bytes sub-vocabulary, do not (docs/algorithm.md §7.3)"
)


@click.command()
@click.argument("model_refs", metavar="MODEL MODEL [MODEL...]", nargs=-1, required=True)
@click.option(
    "--n-ctx",
    type=int,
    help="The context every model gets (default: each model's n_ctx in models.toml, "
    "else [defaults] n_ctx).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def pair(ctx: click.Context, model_refs: tuple[str, ...], n_ctx: int | None, as_json: bool) -> None:
    """Check models before running them together: their common vocabulary and the share
    of each one's tokens it holds, their pre-tokenizers, and the memory they need
    together against what this machine has free. Exits 1 when they cannot fit."""
    if len(model_refs) < 2:
        raise click.UsageError("give at least two models")
    settings = with_overrides(get_config(ctx).defaults, n_ctx=n_ctx)
    specs = model_specs(ctx, model_refs, ())
    if n_ctx is not None:
        specs = [replace(s, n_ctx=None) for s in specs]
    plan = memory_plan(specs, settings)
    vocabs = [load_vocabulary(s.resolve_path(), name=s.name) for s in specs]
    report = common_report(vocabs)
    labels = {v.name: tokenizer_label(v) for v in vocabs}
    warning = (
        SPLIT_WARNING.format(labels=_joined(labels)) if len(set(labels.values())) > 1 else None
    )
    if as_json:
        echo_json(_json_report(report, labels, warning, plan))
    else:
        _print_report(report, labels, warning, plan)
    check_memory(plan)


def tokenizer_label(v: Vocabulary) -> str:
    """The tokenizer model and its pre-tokenizer, as the GGUF names them ("gpt2/smollm")."""
    return f"{v.tokenizer_model}/{v.tokenizer_pre or 'default'}"


def _joined(labels: dict[str, str]) -> str:
    return ", ".join(f"{name}: {label}" for name, label in labels.items())


def _print_report(
    report: dict[str, object], labels: dict[str, str], warning: str | None, plan: MemoryPlan
) -> None:
    click.echo(f"common vocabulary: {report['n_pieces']:,} pieces")
    models = report["models"]
    assert isinstance(models, list)
    rows = [
        (
            m["name"],
            labels[m["name"]],
            f"{m['n_tokens']:,}",
            f"{m['tokens_that_are_pieces']:,}",
            f"{100 * m['coverage']:.1f}%",
        )
        for m in models
    ]
    click.echo(table(("MODEL", "TOKENIZER/PRE", "TOKENS", "IN COMMON", "SHARE"), rows))
    if warning:
        click.echo(f"warning: {warning}")
    click.echo("")
    click.echo(table(MEMORY_HEADERS, [_memory_row(m) for m in plan.members]))
    for line in memory_verdicts(plan):
        click.echo(line)


MEMORY_HEADERS = ("MODEL", "N_CTX", "WEIGHTS", "KV CACHE", "BUFFERS", "OFFLOADED", "HERE")


def _memory_row(m: MemberMemory) -> tuple[object, ...]:
    offloaded = "-"
    if m.offload_to in (GPU, RPC):
        offloaded = f"{gib(m.need.offloaded)} ({m.offload_to.upper()})"
    elif m.offload_to == NO_GPU:
        offloaded = "none: no GPU"
    need = m.need
    return (
        m.name,
        m.n_ctx,
        gib(need.weights),
        gib(need.kv_cache),
        gib(need.buffers),
        offloaded,
        gib(m.host),
    )


def memory_verdicts(plan: MemoryPlan) -> list[str]:
    """One line per memory the members use: RAM, GPU memory, RPC servers."""
    available = gib(plan.available) if plan.available is not None else "unknown"
    verdict = "fits" if plan.fits_host else "does NOT fit"
    lines = [f"memory: {gib(plan.host)} needed here, {available} available: {verdict}"]
    if plan.gpu:
        names = ", ".join(f"{d.name} ({d.description})" for d in plan.devices)
        verdict = "fits" if plan.fits_gpu else "does NOT fit"
        lines.append(
            f"GPU: {gib(plan.gpu)} needed, {gib(plan.gpu_free)} free on {names}: {verdict}"
        )
    if plan.offload_without_gpu:
        lines.append(
            "GPU: n_gpu_layers asks for offloading, but llama.cpp found no GPU device: "
            "those layers are counted here, on the CPU (a build without GPU support "
            "refuses to load them: set n_gpu_layers = 0, or rebuild llama-cpp-python "
            "with a GPU backend)"
        )
    if plan.rpc:
        lines.append(f"RPC servers: {gib(plan.rpc)} offloaded to them (each checks its own)")
    return lines


def _json_report(
    report: dict[str, object], labels: dict[str, str], warning: str | None, plan: MemoryPlan
) -> dict[str, object]:
    memory = {
        "members": [
            {
                "name": m.name,
                "n_ctx": m.n_ctx,
                "weights": m.need.weights,
                "kv_cache": m.need.kv_cache,
                "buffers": m.need.buffers,
                "offload_to": m.offload_to,
                "offloaded": m.need.offloaded if m.offload_to in (GPU, RPC) else 0,
                "host": m.host,
            }
            for m in plan.members
        ],
        "host": plan.host,
        "available": plan.available,
        "gpu": plan.gpu,
        "gpu_free": plan.gpu_free,
        "gpu_devices": [asdict(d) for d in plan.devices],
        "rpc": plan.rpc,
        "fits": plan.fits,
    }
    return {**report, "tokenizers": labels, "warning": warning, "memory": memory}
