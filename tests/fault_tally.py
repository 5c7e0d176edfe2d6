"""Counts of generated fault cases, per class of the fault issue: how many were tried
and how many held their invariants. Printed at the end of the session (pytest -s or
the terminal summary) so that a run reports "tried N, held N" per class."""

from __future__ import annotations

from collections import Counter

TRIED: Counter[str] = Counter()
HELD: Counter[str] = Counter()


def tally(kind: str, held: bool) -> None:
    TRIED[kind] += 1
    HELD[kind] += int(held)


def report() -> list[str]:
    return [f"{kind}: tried {TRIED[kind]}, held {HELD[kind]}" for kind in sorted(TRIED)]
