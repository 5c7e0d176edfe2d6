"""The `lvr` command line: one click group; commands only present, the library works.

Every user mistake (bad models.toml, missing or corrupt GGUF, unsupported tokenizer,
bad flag value) reaches the user as one 'Error: ...' line and exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from lvr_local import __version__
from lvr_local.cli_common import echo_json, get_config, load_vocab, size_text, table
from lvr_local.errors import LvrError
from lvr_local.paths import user_dir
from lvr_local.vocabulary import TYPE_NAMES, Vocabulary, load_vocabulary


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
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None) -> None:
    """Run several local GGUF models together over their common vocabulary."""
    ctx.obj = {"config_path": config_path}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the models of models.toml: file, size, tokenizer, vocabulary size."""
    config = get_config(ctx)
    records = [_model_record(spec) for spec in config.models]
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
            r["tokenizer"],
            r["n_vocab"],
            r["path"],
        )
        for r in records
    ]
    headers = ("NAME", "ENABLED", "STATUS", "SIZE", "TOKENIZER", "VOCAB", "PATH")
    click.echo(table(headers, rows))


def _model_record(spec: Any) -> dict[str, object]:
    record: dict[str, object] = {
        "name": spec.name,
        "enabled": spec.enabled,
        "weight": spec.weight,
        "source": spec.source,
        "path": "",
        "status": "missing",
        "size": "",
        "tokenizer": "",
        "n_vocab": "",
    }
    try:
        path = spec.resolve_path()
        record["path"] = str(path)
        vocab = load_vocabulary(path, name=spec.name)
    except LvrError as e:
        record["error"] = str(e)
        return record
    record.update(
        status="found",
        size=size_text(path.stat().st_size),
        tokenizer=vocab.tokenizer_model,
        n_vocab=vocab.n_tokens,
    )
    return record


@cli.command()
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
    from lvr_local.gguf_tokens import verify_vocabulary  # the gguf reader is slow to import

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


@cli.command()
@click.argument("model_refs", metavar="MODEL MODEL [MODEL...]", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def common(ctx: click.Context, model_refs: tuple[str, ...], as_json: bool) -> None:
    """The maximal common vocabulary of two or more models."""
    from lvr_local.subvocab import common_report

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


@cli.command()
@click.pass_context
def paths(ctx: click.Context) -> None:
    """Show where lvr-local reads its config and keeps its files."""
    from lvr_local.config import find_config_path

    click.echo(f"user directory: {user_dir()}  (move it with LVR_HOME)")
    click.echo(f"config file:    {find_config_path(ctx.obj['config_path'])}")


def _register_decoding_commands() -> None:
    from lvr_local.cli_decode import bench, chat, generate, score

    for command in (generate, chat, score, bench):
        cli.add_command(command)

    from tui.cli import tui  # imports only click; textual loads when `lvr tui` runs

    cli.add_command(tui)


_register_decoding_commands()


def main() -> None:
    cli(prog_name="lvr")


if __name__ == "__main__":
    main()
