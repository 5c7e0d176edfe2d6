"""The inspection commands: `lvr models`, `lvr vocab`, `lvr common`, `lvr paths`,
`lvr settings`. Nothing here loads model weights."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import click

from lvr_local.cli.common import echo_json, get_config, load_vocab, size_text, table
from lvr_local.cli.found import show_found
from lvr_local.core.vocabulary import TYPE_NAMES, Vocabulary
from lvr_local.decoding.roles import detect_role
from lvr_local.errors import LvrError
from lvr_local.llama.extra_buffers import cached_verdict
from lvr_local.llama.vocab_reader import load_vocabulary
from lvr_local.paths import user_dir
from lvr_local.runner.config import ModelSpec, find_config_path
from lvr_local.runner.settings import MODES, RunSettings
from lvr_local.runner.sources import NotAssembledError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option(
    "--found",
    is_flag=True,
    help="List instead the GGUF models of Ollama, the Hugging Face cache and LM Studio, "
    "by the names -m and models.toml accept.",
)
@click.pass_context
def models(ctx: click.Context, as_json: bool, found: bool) -> None:
    """List the models of models.toml: file, size, tokenizer, vocabulary size, and where
    each runs (this machine, or the RPC servers that hold its layers)."""
    if found:
        show_found(as_json)
        return
    config = get_config(ctx)
    records = [_model_record(spec, config.defaults) for spec in config.models]
    if as_json:
        echo_json({"config": str(config.path), "models": records})
        return
    click.echo(f"config: {config.path}")
    rows = [
        (
            r["name"],
            "yes" if r["enabled"] else "no",
            r["status"],
            r["size"],
            r["role"],
            r["tokenizer"],
            r["n_vocab"],
            r["runs_on"],
            r["path"],
        )
        for r in records
    ]
    headers = ("NAME", "ENABLED", "STATUS", "SIZE", "ROLE", "TOKENIZER", "VOCAB", "RUNS ON", "PATH")
    click.echo(table(headers, rows))
    for r in records:  # never silent: why a model is not usable
        if "error" in r:
            click.echo(f"{r['name']}: {r['error']}", err=True)


def path_exists(path: object) -> bool:
    return bool(path) and Path(str(path)).exists()


def _model_record(spec: ModelSpec, defaults: RunSettings) -> dict[str, object]:
    """What `lvr models` shows of one model. Cheap: a chunked package model that has not
    been assembled yet is reported as such, not assembled just to be listed."""
    servers = spec.rpc_servers(defaults)
    record: dict[str, object] = {
        "name": spec.name,
        "enabled": spec.enabled,
        "weight": spec.weight,
        "source": spec.source,
        "path": "",
        "status": "missing",
        "size": "",
        "role": spec.role or "",
        "tokenizer": "",
        "n_vocab": "",
        "runs_on": "rpc " + ", ".join(servers) if servers else "local",
        "rpc": list(servers),
    }
    try:
        path = spec.resolve_path(assemble=False)
        record["path"] = str(path)
        vocab = load_vocabulary(path, name=spec.name)
    except NotAssembledError:
        record["status"] = "not assembled yet (done at its first run)"
        return record
    except LvrError as e:
        record["error"] = str(e)
        if path_exists(record["path"]):
            record["status"] = "unusable"
        return record
    record.update(
        status="found",
        size=size_text(path.stat().st_size),
        role=spec.role or detect_role(vocab, spec.chat_template),
        tokenizer=vocab.tokenizer_model,
        n_vocab=vocab.n_tokens,
    )
    return record


@click.command()
@click.argument("model")
@click.option("--dump", is_flag=True, help="One line per token: id, type, bytes as hex.")
@click.option(
    "--verify",
    is_flag=True,
    help="Compare every token's bytes with an independent decoding of the GGUF.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def vocab(ctx: click.Context, model: str, dump: bool, verify: bool, as_json: bool) -> None:
    """Show the vocabulary of MODEL (a models.toml name or a .gguf path)."""
    v = load_vocab(ctx, model)
    if dump:
        _dump_tokens(v)
        return
    summary = v.summary()
    if verify:
        summary["verify"] = _verify(v)
    if as_json:
        echo_json(summary)
        return
    for key, value in summary.items():
        click.echo(f"{key:>24}: {value}")
    if verify and summary["verify"]["mismatches"]:
        raise click.ClickException(f"{summary['verify']['mismatches']} tokens disagree")


def _verify(v: Vocabulary) -> dict[str, object]:
    from lvr_local.llama.gguf_tokens import verify_vocabulary  # the gguf reader is slow to import

    report = verify_vocabulary(v)
    return {
        "agree": report.agree,
        "end_of_generation_with_text": len(report.end_with_text),
        "undecodable_characters": len(report.undecodable),
        "mismatches": len(report.mismatches),
        "first_mismatches": report.mismatches[:10],
    }


def _dump_tokens(v: Vocabulary) -> None:
    out = sys.stdout
    for i in range(v.n_tokens):
        raw = v.token_bytes(i)
        kind = "end" if v.is_end[i] else TYPE_NAMES[int(v.token_type[i])]
        out.write(f"{i}\t{kind}\t{raw.hex() if raw is not None else '-'}\n")
    out.flush()


@click.command()
@click.argument("model_refs", metavar="MODEL MODEL [MODEL...]", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def common(ctx: click.Context, model_refs: tuple[str, ...], as_json: bool) -> None:
    """The maximal common vocabulary of two or more models."""
    from lvr_local.core.subvocab import common_report

    if len(model_refs) < 2:
        raise click.UsageError("give at least two models")
    vocabs = [load_vocab(ctx, ref) for ref in model_refs]
    report = common_report(vocabs)
    if as_json:
        echo_json(report)
        return
    click.echo(f"common pieces:        {report['n_pieces']:,}")
    click.echo(f"shared token strings: {report['n_shared_token_strings']:,}")
    click.echo(f"single bytes added:   {report['single_bytes_added']}")
    click.echo(f"mean piece length:    {report['mean_piece_bytes']} bytes")
    rows = [
        (
            m["name"],
            f"{m['n_tokens']:,}",
            f"{m['tokens_with_bytes']:,}",
            f"{m['tokens_that_are_pieces']:,}",
            f"{100 * m['coverage']:.1f}%",
        )
        for m in report["models"]
    ]
    headers = ("MODEL", "TOKENS", "WITH BYTES", "ARE PIECES", "COVERAGE")
    click.echo(table(headers, rows))


@click.command()
@click.pass_context
def paths(ctx: click.Context) -> None:
    """Show where lvr-local reads its config and keeps its files."""
    click.echo(f"user directory: {user_dir()}  (move it with LVR_HOME)")
    click.echo(f"config file:    {find_config_path(ctx.find_root().obj['config_path'])}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
@click.pass_context
def settings(ctx: click.Context, as_json: bool) -> None:
    """Show every run setting in force and where it comes from (default or models.toml)."""
    config = get_config(ctx)
    defaults = RunSettings()
    by_mode = {mode: config.defaults.for_mode(mode).as_record() for mode in MODES}
    extra = {spec.name: _extra_buffers(spec, config.defaults) for spec in config.models}
    if as_json:
        values = config.defaults.as_record()  # None: the mode's value, given in by_mode
        echo_json(
            {
                "config": str(config.path),
                "settings": values,
                "by_mode": by_mode,
                "extra_buffers": extra,
            }
        )
        return
    click.echo(f"config: {config.path}")
    rows = [
        (
            f.name,
            _per_mode(by_mode, f.name),
            "default" if getattr(config.defaults, f.name) == getattr(defaults, f.name) else "file",
        )
        for f in fields(RunSettings)
    ]
    click.echo(table(("SETTING", "VALUE", "FROM"), rows))
    if extra:
        click.echo("extra buffers in force, per model:")
    for name, record in extra.items():
        click.echo(f"  {name}: {record['in_force']} ({record['why']})")


def _extra_buffers(spec: ModelSpec, defaults: RunSettings) -> dict[str, object]:
    """What `extra_buffers` a model loads with and why: the setting, or for "auto" the
    kept probe verdict (none yet: the probe runs at the model's first load, or in
    `lvr doctor`). Cheap: nothing is probed or loaded here."""
    setting = spec.extra_buffers or defaults.extra_buffers
    source = "models.toml [[model]]" if spec.extra_buffers else "run settings"
    record: dict[str, object] = {"setting": setting, "from": source}
    if setting != "auto":
        return {**record, "in_force": setting, "why": f"extra_buffers = {setting} ({source})"}
    try:
        found = cached_verdict(spec.resolve_path(assemble=False))
    except LvrError:
        found = None
    if found is None:
        why = "auto: not probed yet on this machine and build; probed at the first load"
        return {**record, "in_force": "decided at load", "why": why}
    return {**record, "in_force": "on" if found.safe else "off", "why": f"auto: {found.reason}"}


def _per_mode(by_mode: dict[str, dict[str, object]], key: str) -> str:
    """One value, or each mode's where they differ ("chat 0.8, raw 0")."""
    shown = {mode: _shown(values[key]) for mode, values in by_mode.items()}
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{mode} {value}" for mode, value in shown.items())


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(repr(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)
