"""lm-evaluation-harness tasks on each system, and the paired comparison of the results.

Each system runs lm-eval's own `simple_evaluate` on an `LvrLM` (lm_eval_model.py), so
its figures are lm-eval's, computed by lm-eval. The per-sample results (lm-eval's
`samples`, always kept) then become `lvr eval`'s (numerator, denominator) pairs, and
`results.compare` sets every ensemble against the best member with the same paired
bootstrap `lvr eval` prints:

- a metric averaged over documents (acc, acc_norm, exact_match, ...): (value, 1);
- bits_per_byte, whose samples are (log-likelihood, bytes): (bits, bytes), so the
  ratio is lm-eval's aggregate;
- the perplexities are exponentials of such ratios, not ratios: not compared (their
  bits_per_byte is).

Metrics are keyed `TASK/METRIC` (`TASK/METRIC,FILTER` under a filter other than lm-eval's
`none`), the names of lm-eval's own results.

With `cache_db`, lm-eval's CachingLM keeps every answer in SQLite as it is computed (the
model's cache hook): a rerun with the same file answers those from it and computes only
the rest. The file's answers carry no model or setting, so each system and setting needs
a file of its own (the command line names them so).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

from lvr_local.errors import LvrError
from lvr_local.evaluation.lm_eval_model import LvrLM, Progress
from lvr_local.evaluation.results import Comparison, compare
from lvr_local.evaluation.systems import System
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

BITS = "bits_per_byte"
NOT_RATIOS = {"word_perplexity", "byte_perplexity"}


@dataclass(frozen=True)
class LmEvalOptions:
    """lm-eval's own options, passed through to `simple_evaluate`."""

    tasks: tuple[str, ...]
    num_fewshot: int | None = None
    limit: float | None = None
    apply_chat_template: bool = False
    bootstrap_iters: int = 100_000
    greedy_check: bool = True  # compute is_greedy (see LvrLM)


def task_manager(tasks: Sequence[str], include_path: Path | None) -> TaskManager:
    """lm-eval's index of tasks (its own and those under `include_path`), with every
    task name checked, so that a typo fails before the models load."""
    if include_path is not None and not include_path.exists():
        raise LvrError(f"--include_path: {include_path} does not exist")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
    unknown = [t for t in unknown if not manager.match_tasks([t])]
    if unknown:
        raise LvrError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}: expected a task or group "
            "of lm-eval (lm-eval ls tasks), one in --include_path, or a task's YAML file"
        )
    return manager


def evaluate_system(
    runner: Runner,
    system: System,
    settings: RunSettings,
    options: LmEvalOptions,
    manager: TaskManager,
    cache_db: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict for one system (with `samples`), and under
    `lvr_seconds` the mean seconds per request computed here, by request type."""
    model = LvrLM(runner, system, settings, greedy_check=options.greedy_check)
    model.progress = progress or model.progress
    results = lm_eval.simple_evaluate(
        model=model,
        tasks=list(options.tasks),
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        use_cache=cache_db,
        log_samples=True,
        bootstrap_iters=options.bootstrap_iters,
        apply_chat_template=options.apply_chat_template,
        task_manager=manager,
    )
    if results is None:  # only a secondary rank gets None; this is a single process
        raise LvrError("lm-eval returned no results")
    results["lvr_seconds"] = {
        kind: {"requests": len(times), "mean": sum(times) / len(times)}
        for kind, times in model.seconds.items()
    }
    return results


def sample_pairs(results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Metric key -> {document id: (numerator, denominator)} from lm-eval's samples."""
    pairs: dict[str, dict[str, list[float]]] = {}
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            suffix = "" if sample.get("filter", "none") == "none" else f",{sample['filter']}"
            for metric in sample.get("metrics", ()):
                pair = as_pair(metric, sample.get(metric))
                if pair is not None:
                    pairs.setdefault(f"{task}/{metric}{suffix}", {})[str(sample["doc_id"])] = pair
    return pairs


def as_pair(metric: str, value: Any) -> list[float] | None:
    """One sample's value as (numerator, denominator), None when it is not a ratio."""
    if metric in NOT_RATIOS:
        return None
    if metric == BITS and isinstance(value, list | tuple) and len(value) == 2:
        loglikelihood, size = value
        return [-float(loglikelihood) / math.log(2), float(size)]
    if isinstance(value, bool | numbers.Real):
        return [float(value), 1.0]
    return None


def comparisons(
    per_system: dict[str, dict[str, Any]], members: Sequence[str], seed: int
) -> list[Comparison]:
    """Every ensemble against the best member, per metric, over the documents both
    have: `lvr eval`'s paired bootstrap."""
    pairs = {
        (system, key): by_doc
        for system, results in per_system.items()
        for key, by_doc in sample_pairs(results).items()
    }
    return compare(pairs, list(per_system), members, seed)


def write_results(folder: Path, system: str, results: dict[str, Any], log_samples: bool) -> Path:
    """lm-eval's results for one system as FOLDER/SYSTEM/results.json, and with
    `log_samples` each task's samples as samples_TASK.jsonl beside it."""
    where = folder / system.replace(":", "-")
    try:
        where.mkdir(parents=True, exist_ok=True)
        kept = {k: v for k, v in results.items() if k != "samples"}
        text = json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False)
        (where / "results.json").write_text(text + "\n", encoding="utf-8")
        if log_samples:
            for task, samples in results.get("samples", {}).items():
                lines = [
                    json.dumps(s, default=handle_non_serializable, ensure_ascii=False)
                    for s in samples
                ]
                (where / f"samples_{task}.jsonl").write_text(
                    "".join(line + "\n" for line in lines), encoding="utf-8"
                )
    except OSError as e:
        raise LvrError(f"cannot write the results to {where}: {e.strerror or e}") from e
    return where
