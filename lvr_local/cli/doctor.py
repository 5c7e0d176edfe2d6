"""`lvr doctor`: the one command to run when something is wrong. It only presents;
lvr_local/runner/doctor.py examines."""

from __future__ import annotations

import dataclasses

import click

from lvr_local.cli.common import echo_json, get_config
from lvr_local.errors import LvrError
from lvr_local.runner.doctor import Finding, examine, is_broken


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the llama.cpp build, the CPU (and whether llama.cpp's extra buffer types are
    safe on it), RAM and VRAM, the user directory's caches and every model of
    models.toml; name the fix of each problem. Exits with 1 when something is broken."""
    try:
        config, config_error = get_config(ctx), ""
    except LvrError as e:
        config, config_error = None, str(e)
    findings = examine(config, config_error)
    broken = is_broken(findings)
    if as_json:
        records = [dataclasses.asdict(f) for f in findings]
        echo_json({"ok": not broken, "findings": records})
    else:
        _print(findings)
    if broken:
        ctx.exit(1)


def _print(findings: list[Finding]) -> None:
    section = None
    for f in findings:
        if f.section != section:
            section = f.section
            click.echo(f"\n{section}" if f is not findings[0] else section)
        mark = "BROKEN " if f.broken else "warning " if f.problem else ""
        click.echo(f"  {f.name:<28} {f.value}")
        if f.problem:
            click.echo(f"    {mark}{f.problem}")
            click.echo(f"    fix: {f.fix}")
    problems = [f for f in findings if f.problem]
    broken = [f for f in problems if f.broken]
    summary = (
        f"{len(broken)} broken, {len(problems) - len(broken)} warnings"
        if problems
        else "everything looks right"
    )
    click.echo(f"\n{summary}")
