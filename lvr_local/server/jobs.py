"""The work a request hands the worker thread, and the items it reports back.

A job puts the runner's members as the request wants them (which take part, with what
weights), runs the generation with the request's settings and cancel event, reports
each piece as it comes, and puts the members back, whatever happened: one request's
weights never leak into the next.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lvr_local.core.chat import Message
from lvr_local.decoding.ensemble import PieceEvent
from lvr_local.runner.run import Run, Runner
from lvr_local.server.plan import RequestPlan
from lvr_local.server.worker import Work


@dataclass(frozen=True)
class Started:
    """The prompt is evaluated; its length in tokens (the longest member's own)."""

    prompt_tokens: int


@dataclass(frozen=True)
class Piece:
    event: PieceEvent


@dataclass(frozen=True)
class Echo:
    """The prompt scored byte by byte, exactly (docs/algorithm.md §2), for echo."""

    events: tuple[PieceEvent, ...]


@dataclass(frozen=True)
class Finished:
    stop_reason: str
    record: dict[str, Any]


@contextlib.contextmanager
def members_as_planned(runner: Runner, plan: RequestPlan) -> Iterator[None]:
    """The members on/off and weighted as the request asks, restored afterwards."""
    weights = [m.weight for m in runner.members]
    enabled = [m.enabled for m in runner.members]
    try:
        runner.set_enabled(plan.enabled)
        if plan.weights is not None:
            wanted = [
                w if w is not None else old for w, old in zip(plan.weights, weights, strict=True)
            ]
            runner.set_weights(wanted)
        yield
    finally:
        runner.set_enabled(enabled)
        runner.set_weights(weights)


def chat_work(plan: RequestPlan, messages: Sequence[Message]) -> Work:
    def work(runner: Runner, cancel: threading.Event) -> Iterator[Any]:
        with members_as_planned(runner, plan):
            run = runner.chat(messages, plan.settings, cancel, plan.top_n)
            yield from run_items(runner, run)

    return work


def completion_work(plan: RequestPlan, prompt: bytes, score_prompt: bool) -> Work:
    """A raw continuation (exact when the prompt ends mid-token); with `score_prompt`,
    the prompt's own bytes are scored first."""

    def work(runner: Runner, cancel: threading.Event) -> Iterator[Any]:
        with members_as_planned(runner, plan):
            if score_prompt and prompt:
                scored = []
                for event in runner.score(prompt, b"", plan.settings):
                    if cancel.is_set():
                        return
                    scored.append(event)
                yield Echo(tuple(scored))
            run = runner.complete(prompt, plan.settings, cancel, plan.top_n)
            yield from run_items(runner, run)

    return work


def run_items(runner: Runner, run: Run) -> Iterator[Any]:
    """A run as the job's items: Started (once the prompt is read), a Piece per piece,
    then Finished with the stop reason and the run's record."""
    taking_part = [b for b, m in zip(runner.backends, runner.members, strict=True) if m.enabled]
    yield Started(max(len(b.prompt) for b in taking_part))
    for chunk in run:
        yield Piece(chunk.event)
    yield Finished(run.stats.stop_reason, run.record())
