"""Scoring one node: a row of logits becomes token weights and a next-piece distribution.

This is the engine's full-vocabulary hot path, run once per model forward pass
(docs/algorithm.md §3, fresh nodes): every token sends its probability to its first piece.
Two exact strategies, chosen once per (model, sub-vocabulary) from the tables:

- scatter: one exp and one scatter-add (`np.add.at`) of all token weights into pieces.
  Used when many tokens share a first piece (the common vocabulary: 228k of Gemma's
  tokens feed 18.7k pieces).
- identity: when almost every piece has exactly one token (a model over its own
  vocabulary), log q of those pieces is just logit - logsumexp, gathered in piece
  order; only the few pieces fed by several tokens are summed.

Sampling on the member's tokens (`sampling`, docs/algorithm.md §7.5): the node's
distribution is llama.cpp's sampler applied to the model's own tokens (top-k, top-p,
min-p, then the temperature), mixed with the model at weight CUT_FLOOR. That is a
token-level language model in its own right, so the reduction of it is exact too: a
member alone samples the texts of (almost exactly) llama.cpp's sampler over its tokens,
over any sub-vocabulary.

Control tokens (no bytes, not END) get no mass: the distribution is conditioned on the
tokens that have bytes or are END.

Precision: a token's own log-probability is logit - logsumexp, computed from the logit,
so advancing and log Q never lose a token to underflow. Sums of probabilities are
float64. The exp itself is float32 by default (`precision="float32"`: 2.5x cheaper than
float64 here, per-token relative error ~6e-8, so q and the logsumexp are good to ~1e-7
relative; a piece whose every token has a logit below about -87 reads -inf in q, yet can
still be forced); `precision="float64"` makes everything float64 (the exactness tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lvr_local.core.decompose import DecompositionTables
from lvr_local.core.logspace import logsumexp_array
from lvr_local.core.sampling import SamplingParams, truncate
from lvr_local.errors import LvrError

NEG_INF = float("-inf")
# The identity strategy pays off while few tokens share a first piece with another token.
IDENTITY_MAX_SHARED = 0.25
PRECISIONS = ("float32", "float64")
# exp of the raw logits is trusted when their normaliser sum(exp(x)) lies in this range:
# nothing overflowed (float32 exp overflows above 88.7) and the largest logit is above
# about -18, so every token within ~69 nats of it is a normal float32.
DIRECT_NORM = (1e-8, 1e30)
ANY_NORM = (0.0, math.inf)
# Sampling on a model's tokens: a token the sampler cuts keeps this share of its own
# probability, so that under the product one member's cut is a strong vote against a
# piece rather than a veto that could leave no piece possible (docs/algorithm.md §7.5).
CUT_FLOOR = 1e-4


@dataclass(frozen=True, eq=False)
class Scored:
    """A fresh node's next-token distribution, as the engine keeps it.

    p(v | w) = exp(logits[v] - lse) for the tokens with bytes or END (and, with top-K, in
    `kept`). The row is the model's own array, not a copy (NextTokenModel rows must not
    change while the engine holds them). `piece_logq` is the node's own next-piece log
    distribution, normalised over its kept tokens, whose total probability is
    exp(log_kept); the engine owns it and may update it in place."""

    logits: np.ndarray
    lse: float
    log_kept: float
    piece_logq: np.ndarray
    kept: np.ndarray | None = None  # bool mask of the tokens top-K kept
    # Sampling on tokens: sorted token ids whose log-probability adds (logaddexp) these
    # terms to exp(logits - lse), the sampler's share of them.
    boost_tokens: np.ndarray | None = None
    boost_logp: np.ndarray | None = None

    def token_logp(self, tokens: np.ndarray) -> np.ndarray:
        """log p(v | w) of the given tokens, exactly (-inf for cut tokens)."""
        if self.lse == NEG_INF:
            return np.full(len(tokens), NEG_INF)
        logp = np.subtract(self.logits[tokens], self.lse, dtype=np.float64)
        if self.kept is not None:
            logp[~self.kept[tokens]] = NEG_INF
        if self.boost_tokens is not None and self.boost_logp is not None and len(tokens):
            at = np.minimum(np.searchsorted(self.boost_tokens, tokens), len(self.boost_tokens) - 1)
            hit = self.boost_tokens[at] == tokens
            logp[hit] = np.logaddexp(logp[hit], self.boost_logp[at[hit]])
        return logp


class NodeScorer:
    """Turns rows of logits of one model into `Scored` values over one sub-vocabulary."""

    def __init__(
        self,
        tables: DecompositionTables,
        top_k: int | None = None,
        precision: str = "float32",
        sampling: SamplingParams | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise LvrError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.exp_dtype = np.float32 if precision == "float32" else np.float64
        self.n_vocab = tables.n_vocab
        self.n_symbols = tables.n_symbols
        self.top_k = top_k or None
        if sampling is not None and not sampling.temperature > 0:
            raise LvrError("sampling on a model's tokens needs a temperature > 0")
        self.sampling = sampling
        first = tables.first_piece
        valid = tables.n_pieces > 0
        self.valid = valid
        self.control = np.flatnonzero(~valid)
        # Scatter target per token: its first piece, or a dump bin for control tokens.
        self.bins = np.where(valid, first, self.n_symbols).astype(np.intp)
        feeders = np.bincount(first[valid], minlength=self.n_symbols)
        shared = valid & (feeders[np.maximum(first, 0)] >= 2)
        self.identity = shared.sum() <= IDENTITY_MAX_SHARED * valid.sum()
        if self.identity:
            self._prepare_identity(first, valid & ~shared, shared, feeders)
        # Scratch for the exp of one row. The scatter sums into float64 bins, and
        # np.add.at is only fast when the weights have the bins' dtype.
        self._weights = np.empty(self.n_vocab, self.exp_dtype if self.identity else np.float64)

    def _prepare_identity(
        self, first: np.ndarray, alone: np.ndarray, shared: np.ndarray, feeders: np.ndarray
    ) -> None:
        self.rep = np.zeros(self.n_symbols, dtype=np.intp)  # the token feeding each piece
        self.rep[first[alone]] = np.flatnonzero(alone)
        self.empty_pieces = np.flatnonzero(feeders == 0)
        self.shared_tokens = np.flatnonzero(shared)
        self.shared_pieces, self.shared_group = np.unique(
            first[self.shared_tokens], return_inverse=True
        )

    def score(self, logits: np.ndarray) -> Scored:
        """One row of logits (the model's own array, not copied) as a node's next-token
        and next-piece distributions: the fast direct exp when the normaliser shows it
        safe, else the careful shifted path (and always with top-K)."""
        x = np.asarray(logits)
        if x.shape != (self.n_vocab,):
            raise LvrError(f"logits of shape {x.shape}, expected ({self.n_vocab},)")
        if self.sampling is not None:
            return self._sampled(x)
        if self.top_k is None:
            return self._plain(x)
        return self._score_carefully(x)

    def _score_carefully(self, x: np.ndarray) -> Scored:
        """Subtract the largest logit, then exp in float64 (rare, or top-K)."""
        top = float(x.max())
        if math.isnan(top) or top == math.inf:
            raise LvrError("the model returned NaN or +inf logits")
        if top == NEG_INF:
            return self._dead(x)
        w = np.exp(np.subtract(x, top, dtype=np.float64))
        if self.top_k is not None:
            scored = self._cut_to_top_k(x, w, top)
        else:
            scored = self._summed(x, w, top, ANY_NORM)
        return scored if scored is not None else self._rescaled(x)

    def _summed(
        self, x: np.ndarray, w: np.ndarray, offset: float, norm_range: tuple[float, float]
    ) -> Scored | None:
        """The node's distribution from weights w = exp(x - offset); None when their sum
        is outside `norm_range` (the weights cannot be trusted)."""
        if self.identity:
            return self._by_identity(x, w, offset, norm_range)
        return self._by_scatter(x, w, offset, norm_range)

    def _by_scatter(
        self, x: np.ndarray, w: np.ndarray, offset: float, norm_range: tuple[float, float]
    ) -> Scored | None:
        mass = np.zeros(self.n_symbols + 1)  # the last bin collects control tokens
        np.add.at(mass, self.bins, w)
        logq = mass[:-1]
        norm = float(logq.sum())
        if not norm_range[0] < norm < norm_range[1]:
            return None
        log_norm = math.log(norm)
        with np.errstate(divide="ignore"):
            np.log(logq, out=logq)
        logq -= log_norm
        return Scored(x, offset + log_norm, 0.0, logq)

    def _by_identity(
        self, x: np.ndarray, w: np.ndarray, offset: float, norm_range: tuple[float, float]
    ) -> Scored | None:
        w[self.control] = 0.0
        norm = float(w.sum())  # pairwise summation: ~1e-7 relative in float32
        if not norm_range[0] < norm < norm_range[1]:
            return None
        lse = offset + math.log(norm)
        # In the exp's precision: float32 halves the memory traffic of this gather, the
        # step's largest after the exp (q is then good to ~1e-7 relative).
        logq = x.take(self.rep).astype(self.exp_dtype, copy=False)
        logq -= lse
        logq[self.empty_pieces] = NEG_INF
        if len(self.shared_tokens):
            mass = np.bincount(self.shared_group, weights=w[self.shared_tokens])
            with np.errstate(divide="ignore"):
                logq[self.shared_pieces] = np.log(mass) - math.log(norm)
        return Scored(x, lse, 0.0, logq)

    def _cut_to_top_k(self, x: np.ndarray, w: np.ndarray, offset: float) -> Scored | None:
        """K-LVR: only the K most likely tokens with bytes (or END) keep their mass."""
        w[self.control] = 0.0
        norm = float(w.sum())
        if norm == 0.0:
            return None
        k = min(self.top_k or 1, len(x) - len(self.control))
        masked = np.where(self.valid, x, NEG_INF)
        best = np.argpartition(masked, len(x) - k)[len(x) - k :]
        best = best[w[best] > 0.0]
        kept = np.zeros(len(x), dtype=bool)
        kept[best] = True
        mass = np.zeros(self.n_symbols + 1)
        np.add.at(mass, self.bins[best], w[best])
        kept_norm = float(mass.sum())
        with np.errstate(divide="ignore"):
            logq = np.log(mass[:-1]) - math.log(kept_norm)
        lse = offset + math.log(norm)
        return Scored(x, lse, math.log(kept_norm / norm), logq, kept)

    def _sampled(self, x: np.ndarray) -> Scored:
        """llama.cpp's sampler on the node's tokens with bytes or END, mixed with the
        model itself at weight CUT_FLOOR: p'(v) = (1 - f) * sampler(v) + f * p(v). The
        mixture is the node's whole distribution (nothing counts as pruned: this is the
        model being reduced). Kept sparse: the model's row scaled by f, plus the
        sampler's survivors (`Scored.boost_*`)."""
        plain = self._plain(x)
        if plain.lse == NEG_INF:
            return plain
        survivors, scores = self._survivors(x)
        scores = scores - logsumexp_array(scores)  # log sampler(v) of the survivors
        order = np.argsort(survivors)
        mass = np.zeros(self.n_symbols + 1)
        np.add.at(mass, self.bins[survivors], np.exp(scores))
        with np.errstate(divide="ignore"):
            logq = np.logaddexp(
                math.log(CUT_FLOOR) + plain.piece_logq, math.log1p(-CUT_FLOOR) + np.log(mass[:-1])
            )
        return Scored(
            plain.logits,
            plain.lse - math.log(CUT_FLOOR),
            0.0,
            logq,
            boost_tokens=survivors[order],
            boost_logp=math.log1p(-CUT_FLOOR) + scores[order],
        )

    def _survivors(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens llama.cpp's chain keeps and their tempered log weights. With top-k
        the candidates come from one partial sort of the row as it is (control tokens
        taken out after), not from a copy of the whole vocabulary."""
        params = self.sampling
        assert params is not None
        if params.top_k > 0 and params.top_k + len(self.control) < len(x):
            wide = np.argpartition(x, len(x) - params.top_k - len(self.control))
            ids = wide[len(x) - params.top_k - len(self.control) :]
            ids = ids[self.valid[ids]]
        else:
            ids = np.flatnonzero(self.valid)
        kept, scores = truncate(x[ids].astype(np.float64), params)
        return ids[kept], scores

    def _plain(self, x: np.ndarray) -> Scored:
        """Fast path: one exp of the raw logits, kept when the normaliser shows that
        nothing overflowed and the tokens that matter are far from underflow; else the
        careful shifted path."""
        w = self._weights
        with np.errstate(over="ignore"):
            np.exp(x, out=w, dtype=np.result_type(x.dtype, self.exp_dtype))
        scored = self._summed(x, w, 0.0, DIRECT_NORM)
        return scored if scored is not None else self._score_carefully(x)

    def _rescaled(self, x: np.ndarray) -> Scored:
        """Every token with bytes underflowed next to a huge control-token logit: score
        the row with control tokens masked out instead."""
        masked = np.where(self.valid, x, NEG_INF)
        return self._score_carefully(masked) if masked.max() > NEG_INF else self._dead(x)

    def _dead(self, x: np.ndarray) -> Scored:
        """A row where no token with bytes or END has any probability."""
        return Scored(x, NEG_INF, NEG_INF, np.full(self.n_symbols, NEG_INF))
