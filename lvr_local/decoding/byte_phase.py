"""The prompt's byte-level phase and its hand-over (docs/algorithm.md §6).

A raw prompt may end in the middle of a token. Each member then evaluates the prompt's
head as tokens and is fed the held-back tail byte by byte over the byte sub-vocabulary,
where a token that straddles the prompt's end is summed exactly. The ensemble stays on
bytes while any member still has a token straddling the current position; once every
member is *synchronised* (all its mass on token boundaries), each member's aligned
nodes are handed to a new state over the chosen sub-vocabulary, whose decomposition of
what follows is then exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lvr_local.core.decompose import DecompositionTables, decomposition_tables
from lvr_local.core.lm import TokenPrefix
from lvr_local.core.reduction import ImpossiblePieceError, PieceModel
from lvr_local.core.subvocab import SubVocabulary, byte_level
from lvr_local.decoding.members import Member
from lvr_local.errors import LvrError

# Builds member i's state over the chosen sub-vocabulary from aligned (prefix, log P) nodes.
StateFactory = Callable[[int, list[tuple[TokenPrefix, float]]], PieceModel]


class BytePhase:
    """Byte-level tables for a set of members (built on first use) and the two moves of
    the phase: forcing a prompt's tail, and handing over once synchronised."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)
        self.sub: SubVocabulary = byte_level()
        self._tables: list[DecompositionTables] | None = None

    @property
    def tables(self) -> list[DecompositionTables]:
        if self._tables is None:
            self._tables = [decomposition_tables(m.vocab, self.sub) for m in self.members]
        return self._tables

    def force_tail(
        self, member: Member, state: PieceModel, tail: bytes, after: bytes = b""
    ) -> None:
        """Feed the held-back bytes of the prompt to one member's byte-level state. The
        tail (and `after`, text known to follow it) is known: pruning keeps the branches
        that can spell it."""
        known = byte_pieces(self.sub, tail + after)
        for i, value in enumerate(tail):
            try:
                state.advance(int(known[i]), known[i + 1 :])
            except ImpossiblePieceError as e:
                raise LvrError(
                    f"model '{member.name}' cannot spell the end of the prompt "
                    f"(byte 0x{value:02x}): {e}"
                ) from e

    @staticmethod
    def synchronised(states: Sequence[PieceModel | None]) -> bool:
        """No live member has a token straddling the current position."""
        return all(s.synchronised for s in states if s is not None)

    @staticmethod
    def hand_over(
        states: Sequence[PieceModel | None], new_state: StateFactory
    ) -> list[PieceModel | None]:
        """New states over the chosen sub-vocabulary (`new_state(i, start)` builds member
        i's), starting from each byte-level state's aligned nodes. Only when
        `synchronised`."""
        return [
            None if state is None else new_state(i, state.hand_over())
            for i, state in enumerate(states)
        ]


def byte_pieces(sub: SubVocabulary, text: bytes) -> np.ndarray:
    """The piece ids of `text` over the byte sub-vocabulary (int64: slices of it serve
    as `ahead` without a copy)."""
    return np.array([sub.index[bytes([b])] for b in text], dtype=np.int64)
