"""The generation loop: pieces until END, a stop string, a turn separator, a budget, or
a stop request; repetition penalties applied before each choice."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lvr_local.core.repetition import RepetitionControl, RepetitionParams
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
    repetition: RepetitionControl | None = None,
    top_n: int = 0,
) -> Generator[PieceEvent, None, None]:
    """Yield pieces until END, a stop string, a turn separator (a base member's end of
    turn: stop reason `end`), a budget, or `should_stop()` (checked before every piece).

    `choose` picks a piece from the combined distribution, after `repetition`'s
    penalties. Neither a stop string nor a turn separator is yielded: pieces that might
    begin one are held back until the text rules it out, and the text is cut where it
    begins (a piece that straddles the cut is yielded cut short). top_n > 0: each event
    also lists the top_n most likely pieces of its step."""
    repetition = repetition or RepetitionControl(RepetitionParams())
    text = Holdback([s.encode("utf-8") for s in budget.stop if s], ensemble.turn_separators)
    t0 = time.perf_counter()
    try:
        for index in range(budget.max_pieces):
            if should_stop():
                stats.stop_reason = "stopped"
                break
            event = ensemble.step(
                lambda logp: choose(repetition.apply(logp, ensemble.phase_sub)), index, top_n
            )
            stats.pieces += 1
            if event.piece == ensemble.end_id and not event.text:
                stats.stop_reason = "end"
                break
            repetition.accept(event.text)
            hit = text.add(event)
            if hit is not None:
                stats.stop_reason = hit
                yield from text.release(final=True)
                return
            yield from text.release()
            if budget.max_bytes is not None and text.size >= budget.max_bytes:
                stats.stop_reason = "max_bytes"
                break
        else:
            stats.stop_reason = "max_pieces"
        yield from text.release(final=True)
    finally:
        stats.bytes = text.released
        stats.seconds = time.perf_counter() - t0


class Holdback:
    """The generated text, and the pieces not yet released because their bytes might
    begin a stop string or a turn separator."""

    def __init__(self, stops: Sequence[bytes], turn_ends: Sequence[bytes]) -> None:
        self.watched = [(s, "stop") for s in stops] + [(s, "end") for s in turn_ends]
        self.longest = max((len(s) for s, _ in self.watched), default=0)
        self.data = b""
        self.released = 0  # bytes yielded so far
        self.held: list[PieceEvent] = []
        self.cut: int | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def add(self, event: PieceEvent) -> str | None:
        """Append a piece; the stop reason when a watched string now appears."""
        start = max(0, len(self.data) - self.longest)
        self.data += event.text
        self.held.append(event)
        found = [(self.data.find(s, start), reason) for s, reason in self.watched]
        hits = sorted((at, reason) for at, reason in found if at >= 0)
        if not hits:
            return None
        self.cut = hits[0][0]
        return hits[0][1]

    def release(self, final: bool = False) -> Iterator[PieceEvent]:
        """The held pieces that can no longer begin a watched string (all of them when
        `final`, up to the cut when one was found)."""
        limit = len(self.data) if final else len(self.data) - self._open_prefix()
        if self.cut is not None:
            limit = self.cut
        while self.held and self.released + len(self.held[0].text) <= limit:
            event = self.held.pop(0)
            self.released += len(event.text)
            yield event
        if final and self.held and self.cut is not None and self.cut > self.released:
            head = self.held[0].text[: self.cut - self.released]  # the piece the cut is in
            self.released += len(head)
            yield replace(self.held[0], text=head)
        if final:
            self.held.clear()

    def _open_prefix(self) -> int:
        """Length of the longest end of the text that is a proper prefix of a watched
        string."""
        for n in range(min(self.longest - 1, len(self.data)), 0, -1):
            tail = self.data[-n:]
            if any(s.startswith(tail) for s, _ in self.watched):
                return n
        return 0
