"""The naive restriction baseline (docs/algorithm.md §7): not lossless, kept to measure that.

At each step only the tokens whose bytes are exactly one piece (and END) keep their
probability; the rest is dropped and the remainder renormalised. Appending a piece
appends its most likely such token, so there is one token path and one node.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lvr_local.core.decompose import DecompositionTables
from lvr_local.core.lm import NextTokenModel, TokenPrefix
from lvr_local.core.logspace import grouped_logsumexp, logsumexp_array
from lvr_local.core.reduction import ImpossiblePieceError
from lvr_local.errors import LvrError


class NaiveState:
    """Same interface as ReducedState (`PieceModel`), over the restricted distribution."""

    def __init__(self, model: NextTokenModel, tables: DecompositionTables) -> None:
        if model.n_vocab != tables.n_vocab:
            raise LvrError(f"model has {model.n_vocab} tokens but its tables have {tables.n_vocab}")
        self.model = model
        self.tables = tables
        self.exact_tokens = np.flatnonzero(tables.n_pieces == 1)
        self.exact_pieces = tables.first_piece[self.exact_tokens].astype(np.intp)
        self.prefix: TokenPrefix = ()
        self.pieces: list[int] = []
        self.log_Q = 0.0
        self.log_pruned = -np.inf  # the restriction drops mass at every step, by design:
        self.last_pruned_fraction = 0.0  # it is not pruning, so nothing is reported
        self.finished = False
        self._logq: np.ndarray | None = None
        self._token_logits: np.ndarray | None = None
        self._to_release: list[TokenPrefix] = []

    @property
    def synchronised(self) -> bool:
        """One token path, always on a token boundary."""
        return True

    def hand_over(self) -> list[tuple[TokenPrefix, float]]:
        """The one token path, for a state over another sub-vocabulary to start from."""
        return [(self.prefix, self.log_Q)]

    @property
    def sub_size(self) -> int:
        return self.tables.n_symbols

    @property
    def needs_model(self) -> bool:
        """Whether the next distribution costs a forward pass: every new piece does."""
        return self._logq is None

    def next_piece_logprobs(self) -> np.ndarray:
        """log q(s | u) of the restricted, renormalised distribution."""
        if self.finished:
            raise LvrError("END was emitted: this state cannot continue")
        if self._logq is None:
            logits = np.asarray(self.model.next_logits([self.prefix])[0], dtype=np.float64)
            self._flush_releases()
            x = logits[self.exact_tokens]
            pieces, log_mass = grouped_logsumexp(self.exact_pieces, x)
            self._logq = np.full(self.sub_size, -np.inf)
            self._logq[pieces] = log_mass - logsumexp_array(x)
            self._logq.flags.writeable = False
            self._token_logits = logits
        return self._logq

    def advance(self, piece: int, ahead: Sequence[int] | None = None) -> None:
        """Append `piece`: its most likely exact token joins the path (one path: a known
        text ahead changes nothing)."""
        logq = self.next_piece_logprobs()
        if not 0 <= piece < self.sub_size:
            raise LvrError(f"piece id {piece} is outside the sub-vocabulary")
        if logq[piece] == -np.inf:
            raise ImpossiblePieceError(
                f"piece {self.tables.sub.piece_bytes(piece)!r} has no exact token here"
            )
        assert self._token_logits is not None
        candidates = self.tables.singles(piece)
        token = int(candidates[np.argmax(self._token_logits[candidates])])
        self.log_Q += float(logq[piece])
        self.pieces.append(piece)
        self._to_release.append(self.prefix)
        self.prefix = (*self.prefix, token)
        self._logq = self._token_logits = None
        if piece == self.tables.sub.end_id:
            self.finished = True
            self._flush_releases()

    def close(self) -> None:
        if self._logq is not None:  # the current prefix was scored
            self._to_release.append(self.prefix)
        self._flush_releases()

    def _flush_releases(self) -> None:
        if self._to_release:
            self.model.release(self._to_release)
            self._to_release = []
