"""`lvr lm-eval`: lm-evaluation-harness tasks on each system, then the comparison.

It only presents: the lm-eval model and the runs are lvr_local.evaluation's
(lm_eval_model.py, lm_eval_run.py). lm-eval's options keep lm-eval's own spellings
(`--tasks`, `--num_fewshot`, ...), so a command line carries over from `lm_eval`. Per
system, lm-eval's own table goes to stdout; progress to stderr.

lm-eval is an optional extra: without it the command says how to install it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from lvr_local.cli.common import model_options, model_specs, open_runner, settings_from
from lvr_local.cli.eval import ProgressLine, print_comparisons
from lvr_local.errors import LvrError
from lvr_local.evaluation.systems import default_system_names, parse_systems
from lvr_local.runner.config import ModelSpec
from lvr_local.runner.settings import RunSettings

INSTALL = "lm-eval is not installed: pip install 'lvr-local[lm-eval]' (or pip install lm-eval)"


def require_lm_eval() -> None:
    """One Error: line, naming the extra, when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise LvrError(INSTALL) from e


@click.command("lm-eval")
@click.option("--tasks", required=True, help="Comma-separated lm-eval tasks or groups.")
@click.option("--num_fewshot", type=click.IntRange(min=0), help="Few-shot examples per prompt.")
@click.option(
    "--limit",
    type=click.FloatRange(min=0, min_open=True),
    help="Only the first N documents per task (a fraction of them when < 1).",
)
@click.option(
    "--include_path",
    type=click.Path(path_type=Path),
    help="A folder of extra task YAML files (relative data paths in them are read from the "
    "current directory, as lm-eval reads them).",
)
@click.option(
    "--output_path",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each system's results as OUTPUT_PATH/SYSTEM/results.json.",
)
@click.option("--log_samples", is_flag=True, help="Also write each task's samples there.")
@click.option(
    "--use_cache",
    help="lm-eval's SQLite cache, one file per system and settings (PATH-SYSTEM-HASH_rank0.db): "
    "a rerun answers what it holds and continues.",
)
@click.option(
    "--apply_chat_template",
    is_flag=True,
    help="Prompts as conversations, each model in its own format (as lvr chat).",
)
@click.option(
    "--bootstrap_iters",
    type=click.IntRange(min=0),
    default=100_000,
    show_default=True,
    help="lm-eval's resamplings for the standard errors of its table (0: none).",
)
@click.option(
    "--no-greedy-check",
    is_flag=True,
    help="Report is_greedy as False instead of checking it by a greedy run (faster).",
)
@click.option(
    "--systems",
    help="Comma-separated: model names, naive, mcv, bytes, each ensemble optionally with "
    ":RULE. Default: each model alone, naive, mcv, bytes.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="The bootstrap's seed.")
@model_options
@click.pass_context
def lm_eval_command(ctx: click.Context, **kw: Any) -> None:
    """Run lm-evaluation-harness TASKS on each model alone and on the ensembles, print
    lm-eval's table per system, then each ensemble against the best model."""
    require_lm_eval()
    from lvr_local.evaluation.lm_eval_run import (
        LmEvalOptions,
        comparisons,
        evaluate_system,
        task_manager,
        write_results,
    )

    options = LmEvalOptions(
        tasks=tuple(t.strip() for t in kw["tasks"].split(",") if t.strip()),
        num_fewshot=kw["num_fewshot"],
        limit=int(kw["limit"]) if kw["limit"] and kw["limit"] >= 1 else kw["limit"],
        apply_chat_template=kw["apply_chat_template"],
        bootstrap_iters=kw["bootstrap_iters"],
        greedy_check=not kw["no_greedy_check"],
    )
    if not options.tasks:
        raise LvrError("--tasks: expected one or more task names, comma-separated")
    settings = settings_from(ctx, kw, temperature=0.0)
    specs = model_specs(ctx, kw["models"], kw["weights"])
    members = [s.name for s in specs]
    names = kw["systems"].split(",") if kw["systems"] else default_system_names(members)
    systems = parse_systems([n.strip() for n in names if n.strip()], members)
    manager = task_manager(options.tasks, kw["include_path"])
    digest = settings_digest(specs, settings)
    per_system: dict[str, dict[str, Any]] = {}
    with open_runner(ctx, kw, settings) as runner:
        for system in systems:
            cache = kw["use_cache"] and f"{kw['use_cache']}-{file_name(system.name)}-{digest}"
            try:
                results = evaluate_system(
                    runner, system, settings, options, manager, cache or None, ProgressLine()
                )
            except KeyboardInterrupt as e:
                again = "rerun to continue" if kw["use_cache"] else "use --use_cache to resume"
                click.echo(f"\n[interrupted: {again}]", err=True)
                ctx.exit(getattr(e, "status", 130))
            per_system[system.name] = results
            print_table(system.name, results)
            if kw["output_path"]:
                write_results(kw["output_path"], system.name, results, kw["log_samples"])
    print_comparisons([vars(c) for c in comparisons(per_system, members, kw["seed"])])


def settings_digest(specs: Sequence[ModelSpec], settings: RunSettings) -> str:
    """What the answers depend on besides the system: the models and the settings."""
    fingerprint = {
        "models": [f"{s.name}={s.source}@{s.weight:g}" for s in specs],
        "settings": json.loads(json.dumps(settings.as_record())),
    }
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]


def file_name(system: str) -> str:
    return system.replace(":", "-")


def print_table(system: str, results: dict[str, Any]) -> None:
    """lm-eval's own table (its groups' table too, when a group ran)."""
    from lm_eval.utils import make_table

    click.echo(f"\n{system}")
    click.echo(make_table(results))
    if results.get("groups"):
        click.echo(make_table(results, "groups"))
    timings = ", ".join(
        f"{kind} {t['mean']:.2f} s ({t['requests']})" for kind, t in results["lvr_seconds"].items()
    )
    click.echo(f"seconds per request computed (requests): {timings or 'none, all cached'}")
