"""The generation loop: pieces until END, a stop string, a budget, or a stop request."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lvr_local.decoding.ensemble import Ensemble, PieceEvent
from lvr_local.errors import LvrError


@dataclass(frozen=True)
class Budget:
    """When a generation stops on its own: after `max_pieces` pieces, after `max_bytes`
    bytes (None: no limit), or where one of the `stop` strings begins."""

    max_pieces: int
    max_bytes: int | None = None
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.max_pieces < 1:
            raise LvrError(f"max_pieces must be >= 1, got {self.max_pieces}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise LvrError(f"max_bytes must be >= 1, got {self.max_bytes}")


@dataclass
class RunStats:
    """What a generation did; `stop_reason` is end, stop, max_pieces, max_bytes,
    stopped (asked to), interrupted (Ctrl-C) or error."""

    pieces: int = 0
    bytes: int = 0
    seconds: float = 0.0
    stop_reason: str = ""


def generate(
    ensemble: Ensemble,
    choose: Callable[[np.ndarray], int],
    budget: Budget,
    stats: RunStats,
    should_stop: Callable[[], bool] = lambda: False,
    top_n: int = 0,
) -> Generator[PieceEvent, None, None]:
    """Yield pieces until END, a stop string, a budget, or `should_stop()` (checked
    before every piece). A stop string is not yielded: the text is cut where it begins
    (the piece it begins in is yielded cut short; text of earlier pieces that begins the
    stop string was already yielded, and `stats.bytes` says where the text ends).
    top_n > 0: each event also lists the top_n most likely pieces of its step."""
    stops = [s.encode("utf-8") for s in budget.stop if s]
    text = b""
    t0 = time.perf_counter()
    try:
        for index in range(budget.max_pieces):
            if should_stop():
                stats.stop_reason = "stopped"
                return
            event = ensemble.step(choose, index, top_n)
            stats.pieces += 1
            if event.piece == ensemble.end_id and not event.text:
                stats.stop_reason = "end"
                return
            hit = find_stop(text, event.text, stops)
            if hit is not None:
                stats.stop_reason, stats.bytes = "stop", hit
                if hit > len(text):  # the stop string begins inside this piece: keep its head
                    yield replace(event, text=event.text[: hit - len(text)])
                return
            text += event.text
            stats.bytes = len(text)
            yield event
            if budget.max_bytes is not None and len(text) >= budget.max_bytes:
                stats.stop_reason = "max_bytes"
                return
        stats.stop_reason = "max_pieces"
    finally:
        stats.seconds = time.perf_counter() - t0


def find_stop(before: bytes, new: bytes, stops: list[bytes]) -> int | None:
    """Length of the text kept when a stop string appears in before + new, else None."""
    if not stops:
        return None
    window_start = max(0, len(before) - max(len(s) for s in stops))
    joined = before + new
    found = [joined.find(s, window_start) for s in stops]
    hits = [f for f in found if f >= 0]
    return min(hits) if hits else None
