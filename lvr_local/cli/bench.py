"""`lvr bench`: native and ensemble speeds side by side in one run."""

from __future__ import annotations

import click

from lvr_local.cli.common import echo_json, model_specs


@click.command()
@click.option(
    "--steps",
    default=128,
    show_default=True,
    type=click.IntRange(min=1),
    help="Greedy steps per decoder.",
)
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    metavar="NAME|PATH",
    help="A model from models.toml or a .gguf file; repeat (default: the enabled models).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def bench(ctx: click.Context, steps: int, models: tuple[str, ...], as_json: bool) -> None:
    """Speeds side by side in one run: native tokens/s of each model, each model alone
    through the engine, and ensemble pieces/s and bytes/s over the MCV and over bytes."""
    from lvr_local.bench import measure, print_report

    report = measure(model_specs(ctx, models, ()), steps)
    if as_json:
        echo_json(report.to_json())
    else:
        print_report(report)
