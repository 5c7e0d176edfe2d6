"""The evaluation loop: every system on every item, one record per (system, view, item).

Two views of the same items:

- `task`: the task's own metric. generate: the answer extracted from a continuation,
  exact match (`exact_match`); code: the completion run against the tests in the
  sandbox (`pass@1`, greedy); choice: the choice with the highest exact
  log-probability (`acc`), or per byte (`acc_norm`), and the correct choice's bits per
  byte.
- `likelihood`: the bits per byte of the reference continuation (a GSM8K solution,
  HumanEval's canonical solution) given the prompt, per system. Small models that
  solve nothing still differ here.

Systems run one after the other (the outer loop), so the ensemble is rebuilt at most
once per system and view; items run in the task's order, so the few-shot prefix every
prompt starts with stays in the members' KV caches from one item to the next.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lvr_local.errors import LvrError
from lvr_local.evaluation.extraction import is_correct
from lvr_local.evaluation.results import ResultLog
from lvr_local.evaluation.sandbox import run_program
from lvr_local.evaluation.systems import System, generate, loglikelihood
from lvr_local.evaluation.tasks import (
    Item,
    Task,
    choice_text,
    item_prompt,
    label_index,
    reference_text,
)
from lvr_local.runner.run import Runner
from lvr_local.runner.settings import RunSettings

VIEWS = ("task", "likelihood")
TASK_METRICS = {"generate": ("exact_match",), "code": ("pass@1",), "choice": ("acc", "acc_norm")}

# label, items done, items in all: called when a system's view starts and after each item.
Progress = Callable[[str, int, int], None]


@dataclass
class Evaluation:
    """What to run: the task's items (the first `limit`), the systems, the views, the
    decoding settings shared by every system, and where results go."""

    runner: Runner
    task: Task
    systems: Sequence[System]
    views: Sequence[str]
    settings: RunSettings
    log: ResultLog
    limit: int | None = None

    @property
    def items(self) -> tuple[Item, ...]:
        return self.task.items[: self.limit] if self.limit else self.task.items

    def views_to_run(self) -> list[str]:
        """A choice task's `task` view already scores every choice, the correct one
        included: its likelihood view would repeat it."""
        if self.task.spec.kind == "choice":
            return ["task"]
        return [v for v in VIEWS if v in self.views]


def run(evaluation: Evaluation, progress: Progress) -> None:
    """Evaluate every (system, view, item) not already in the log, appending each
    record as soon as it is done."""
    items = evaluation.items
    for system in evaluation.systems:
        for view in evaluation.views_to_run():
            label = f"{system.name} ({view})"
            done = sum(evaluation.log.has(system.name, view, it.id) for it in items)
            progress(label, done, len(items))
            cold = True  # the first item of a system in this process: an empty prefix cache
            for item in items:
                if evaluation.log.has(system.name, view, item.id):
                    continue
                record = evaluate_item(evaluation, system, view, item)
                record["cold"] = cold
                cold = False
                evaluation.log.append(record)
                done += 1
                progress(label, done, len(items))


def evaluate_item(evaluation: Evaluation, system: System, view: str, item: Item) -> dict[str, Any]:
    """One record: the item's prompt, what the system made of it, and its metrics."""
    spec = evaluation.task.spec
    prompt = item_prompt(spec, item)
    t0 = time.perf_counter()
    if view == "likelihood":
        result = likelihood_record(evaluation, system, prompt, reference_text(spec, item))
    elif spec.kind == "choice":
        result = choice_record(evaluation, system, prompt, item)
    else:
        result = generation_record(evaluation, system, prompt, item)
    return {
        "system": system.name,
        "view": view,
        "id": item.id,
        "prompt": prompt,
        **result,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def generation_record(
    evaluation: Evaluation, system: System, prompt: str, item: Item
) -> dict[str, Any]:
    """A continuation, checked: exact match of the extracted answer, or the tests."""
    spec = evaluation.task.spec
    gen = generate(evaluation.runner, system, prompt, evaluation.settings)
    record: dict[str, Any] = {
        "output": gen.text,
        "stop_reason": gen.stop_reason,
        "pieces": gen.pieces,
        "prompt_tokens": gen.prompt_tokens,
        "cached_tokens": gen.cached_tokens,
        "forward_passes": gen.forward_passes,
    }
    if spec.kind == "code":
        program = code_program(prompt, gen.text, item, spec.test_field, spec.entry_point_field)
        outcome = run_program(program, timeout=spec.timeout)
        record.update(status=outcome.status, correct=outcome.passed, detail=outcome.detail)
        record["metrics"] = {"pass@1": [int(outcome.passed), 1]}
        return record
    reference = str(item.fields[spec.answer_field])
    extracted, correct = is_correct(gen.text, reference, spec.extract)
    record.update(extracted=extracted, reference=reference, correct=correct)
    record["metrics"] = {"exact_match": [int(correct), 1]}
    return record


def code_program(prompt: str, completion: str, item: Item, test_field: str, entry: str) -> str:
    """HumanEval's program: the prompt, the completion, the tests, and the call that
    runs them on the function."""
    tests = str(item.fields[test_field])
    return f"{prompt}{completion}\n\n{tests}\n\ncheck({item.fields[entry]})\n"


def choice_record(
    evaluation: Evaluation, system: System, prompt: str, item: Item
) -> dict[str, Any]:
    """Every choice scored by exact log-probability after the prompt; the prediction is
    the likeliest choice, in total (acc) and per byte (acc_norm)."""
    spec = evaluation.task.spec
    choices: list[str] = item.fields[spec.choices_field]
    answer = label_index(item.fields[spec.label_field], choices)
    texts = [choice_text(spec, item, c) for c in choices]
    logps = [
        loglikelihood(evaluation.runner, system, prompt, t, evaluation.settings) for t in texts
    ]
    sizes = [len(t.encode("utf-8")) for t in texts]
    pick = max(range(len(choices)), key=lambda i: logps[i])
    pick_norm = max(range(len(choices)), key=lambda i: logps[i] / sizes[i])
    return {
        "output": choices[pick],
        "extracted": pick,
        "extracted_norm": pick_norm,
        "reference": answer,
        "correct": pick == answer,
        "logprobs": logps,
        "metrics": {
            "acc": [int(pick == answer), 1],
            "acc_norm": [int(pick_norm == answer), 1],
            "bits_per_byte": [-logps[answer] / math.log(2), sizes[answer]],
        },
    }


def likelihood_record(
    evaluation: Evaluation, system: System, prompt: str, reference: str
) -> dict[str, Any]:
    """The bits per byte of the reference continuation given the prompt."""
    if not reference:
        raise LvrError(f"task '{evaluation.task.spec.name}' has no reference (its target is empty)")
    logp = loglikelihood(evaluation.runner, system, prompt, reference, evaluation.settings)
    size = len(reference.encode("utf-8"))
    return {
        "output": reference,
        "logprob": logp,
        "metrics": {"bits_per_byte": [-logp / math.log(2), size]},
    }
