"""`lvr eval`: the paper's experiment on a task, for the models given.

It only presents: tasks, systems, the loop and the figures are lvr_local.evaluation's.
The table goes to stdout (or the summary as JSON with --json); progress, with an ETA
per system, goes to stderr.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from lvr_local.cli.common import (
    echo_json,
    model_options,
    model_specs,
    open_runner,
    sampling_options,
    settings_from,
    table,
)
from lvr_local.errors import LvrError
from lvr_local.evaluation.harness import VIEWS, Evaluation, run
from lvr_local.evaluation.results import ResultLog, base_metric, summarize
from lvr_local.evaluation.sandbox import network_isolation
from lvr_local.evaluation.systems import default_system_names, parse_systems
from lvr_local.evaluation.tasks import Task, load_task
from lvr_local.runner.settings import RunSettings


@click.command("eval")
@click.argument("task")
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The task's JSONL file (default: the spec's `data`).",
)
@click.option(
    "--systems",
    help="Comma-separated: model names, naive, mcv, bytes, each ensemble optionally with "
    ":RULE (mcv:product). Default: each model alone, naive, mcv.",
)
@click.option(
    "--views",
    default="task",
    show_default=True,
    help="task (the task's metric), likelihood (bits/byte of the reference), or both.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N items.")
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the results (default: lvr-eval/TASK-HASH of the settings).",
)
@model_options
@sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def eval_command(ctx: click.Context, task: str, **kw: Any) -> None:
    """Compare each model alone, the naive restriction and the ensemble on TASK:
    `humaneval` (built in) or a task spec .toml file. Rerun the same command to resume."""
    loaded = load_task(task, kw["data"])
    views = parse_views(kw["views"])
    settings = eval_settings(ctx, kw, loaded)
    seed = kw["seed"] if kw["seed"] is not None else 0
    # Everything that can be refused is checked before the models load.
    specs = model_specs(ctx, kw["models"], kw["weights"])
    members = [s.name for s in specs]
    names = kw["systems"].split(",") if kw["systems"] else default_system_names(members)
    systems = parse_systems([n.strip() for n in names if n.strip()], members)
    fingerprint = run_fingerprint(loaded, specs, settings, seed)
    folder = kw["output"] or default_folder(loaded, fingerprint)
    log = ResultLog(folder, fingerprint)
    with open_runner(ctx, kw, settings) as runner:
        evaluation = Evaluation(runner, loaded, systems, views, settings, log, kw["limit"])
        try:
            run(evaluation, ProgressLine())
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM where a handler reports it (143)
            click.echo(
                f"\n[interrupted: results so far are in {folder}; rerun to continue]", err=True
            )
            ctx.exit(getattr(e, "status", 130))
        finally:
            log.close()
    item_ids = [it.id for it in evaluation.items]
    summary = summarize(log.records, [s.name for s in systems], members, item_ids, seed)
    summary.update(task=loaded.spec.name, kind=loaded.spec.kind, output=str(folder))
    summary["sandbox_network"] = network_isolation() if loaded.spec.kind == "code" else None
    log.write_summary(summary)
    if kw["as_json"]:
        echo_json(summary)
    else:
        print_summary(summary)


def parse_views(text: str) -> list[str]:
    views = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise LvrError(
            f"--views: expected task, likelihood or both (comma-separated), got {text!r}"
        )
    return views


def eval_settings(ctx: click.Context, kw: dict[str, Any], task: Task) -> RunSettings:
    """The decoding settings every system shares: greedy unless a temperature is given,
    the task's stop strings (and --stop), its budgets unless --max-pieces, --max-bytes."""
    sampled = kw.get("temperature") not in (None, 0)
    settings = settings_from(ctx, kw, **({} if sampled else {"temperature": 0.0}))
    stops = tuple(dict.fromkeys((*task.spec.stop, *settings.stop)))
    budget = kw["max_pieces"] or task.spec.max_pieces
    max_bytes = kw["max_bytes"] or task.spec.max_bytes or None
    return replace(settings, stop=stops, max_pieces=budget, max_bytes=max_bytes)


def run_fingerprint(task: Task, specs: Any, settings: RunSettings, seed: int) -> dict[str, Any]:
    """What the results depend on; a folder holding other values is refused."""
    return {
        "task": task.spec.name,
        "spec": hashlib.sha256(repr(task.spec).encode()).hexdigest()[:16],
        "data": task.fingerprint,
        "models": [f"{s.name}={s.source}@{s.weight:g}" for s in specs],
        "settings": json.loads(json.dumps(settings.as_record())),
        "seed": seed,
    }


def default_folder(task: Task, fingerprint: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]
    return Path("lvr-eval") / f"{task.spec.name}-{digest}"


class ProgressLine:
    """One line on stderr per system and view: items done and the time left, estimated
    from the items done in this process (resumed items cost nothing)."""

    def __init__(self) -> None:
        self.label = ""
        self.t0 = 0.0
        self.start_done = 0
        self.tty = sys.stderr.isatty()

    def __call__(self, label: str, done: int, total: int) -> None:
        if label != self.label:
            self.label, self.t0, self.start_done = label, time.perf_counter(), done
        fresh = done - self.start_done
        elapsed = time.perf_counter() - self.t0
        eta = f", ETA {format_seconds(elapsed / fresh * (total - done))}" if fresh else ""
        line = f"{label}: {done}/{total} items, {format_seconds(elapsed)}{eta}"
        if self.tty:
            click.echo(f"\r{line}\033[K", err=True, nl=done >= total)
        else:
            click.echo(line, err=True)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ----------------------------------------------------------------- the table

PERCENT = {"exact_match", "pass@1", "acc", "acc_norm"}


def metric_text(metric: str, value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{100 * value:.1f}" if metric in PERCENT else f"{value:.4f}"


def print_summary(summary: dict[str, Any]) -> None:
    """The paper's table (system by metric), then each comparison with its interval."""
    rows = summary["systems"]
    metrics = list(dict.fromkeys(m for r in rows.values() for m in r["metrics"]))
    headers = ["system", *metrics, "items", "seconds", "prompt tokens first/later"]
    lines = []
    for name, r in rows.items():
        tokens = r["prompt_tokens"]
        first_later = (
            "-"
            if tokens["first"] is None
            else f"{tokens['first']:.0f}/"
            + ("-" if tokens["later"] is None else f"{tokens['later']:.0f}")
        )
        counts = set(r["items"].values()) or {0}
        items = (
            str(counts.pop())
            if len(counts) == 1
            else ", ".join(f"{n} {view}" for view, n in r["items"].items())
        )
        seconds = f"{sum(r['seconds'].values()):.1f}"
        values = [metric_text(m, r["metrics"].get(m)) for m in metrics]
        lines.append([name, *values, items, seconds, first_later])
    click.echo(f"{summary['task']} ({summary['kind']}), {summary['items']} items")
    click.echo(table(headers, lines))
    print_comparisons(summary["comparisons"])
    click.echo(f"results: {summary['output']}")


def print_comparisons(comparisons: list[dict[str, Any]]) -> None:
    """Each system against the best model: the difference and its interval."""
    for c in comparisons:
        scale = 100 if base_metric(c["metric"]) in PERCENT else 1
        unit = " points" if scale == 100 else ""
        click.echo(
            f"{c['system']} - {c['baseline']} (best model), {c['metric']}: "
            f"{scale * c['difference']:+.4g}{unit}, 95% paired-bootstrap interval "
            f"[{scale * c['low']:+.4g}, {scale * c['high']:+.4g}] over {c['n_items']} items"
        )
