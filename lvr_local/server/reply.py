"""A generation as an API reply: the text released so far and the pieces it completes.

Pieces are the ensemble's tokens: a reply reports `completion_tokens` in pieces, and the
logprobs of a piece (its own and its alternatives) when its text is sent. A piece whose
bytes end inside a UTF-8 character is held back with its text (text.py) and reported
with the text that completes it. (Pieces that might begin a stop string never arrive
before the generation loop rules it out: decoding/generation.py.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lvr_local.decoding.ensemble import PieceEvent
from lvr_local.server.jobs import Echo, Finished, Piece, Started
from lvr_local.server.plan import RequestPlan
from lvr_local.server.text import StreamText


@dataclass(frozen=True)
class Delta:
    """Text now safe to send, and the pieces whose text it completes."""

    text: str
    events: tuple[PieceEvent, ...] = ()


@dataclass
class Reply:
    plan: RequestPlan
    names: Sequence[str]  # every member, in /v1/models order
    prompt_tokens: int = 0
    n_pieces: int = 0
    echo: tuple[PieceEvent, ...] = ()
    finished: Finished | None = None
    text: StreamText = field(init=False)
    _pending: list[tuple[int, PieceEvent]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.text = StreamText()

    def take(self, item: object) -> Delta | None:
        """Take one item of the job; the delta it releases (None: nothing to send)."""
        if isinstance(item, Echo):
            self.echo = item.events
        elif isinstance(item, Started):
            self.prompt_tokens = item.prompt_tokens
        elif isinstance(item, Piece):
            return self._add(item.event)
        elif isinstance(item, Finished):
            return self._finish(item)
        return None

    def _add(self, event: PieceEvent) -> Delta | None:
        self._pending.append((len(self.text.data), event))
        self.n_pieces += 1
        text = self.text.add(event.text)
        if not text:
            return None
        done, self._pending = tuple(e for _, e in self._pending), []
        return Delta(text, done)

    def _finish(self, finished: Finished) -> Delta:
        """The rest of the text, and the pieces not yet reported that spell some of it."""
        self.finished = finished
        end = len(self.text.data)
        text = self.text.finish()
        done = tuple(e for offset, e in self._pending if offset < end)
        self._pending = []
        return Delta(text, done)

    @property
    def member_names(self) -> list[str]:
        """The members that take part in this request."""
        return [n for n, on in zip(self.names, self.plan.enabled, strict=True) if on]

    def summary(self) -> dict[str, Any]:
        """The run's record without its text (stop reason, sub-vocabulary, rule, each
        member's weight and work), reported with piece details."""
        record = dict(self.finished.record) if self.finished is not None else {}
        record.pop("text", None)
        return record

    def usage(self) -> dict[str, int]:
        """Prompt tokens: the longest member prompt in its own tokens; completion: pieces."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.n_pieces,
            "total_tokens": self.prompt_tokens + self.n_pieces,
        }
