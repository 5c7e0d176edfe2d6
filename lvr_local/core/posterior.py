"""The Bayesian mixture's weights: each member's prior times its probability of the
pieces so far, renormalised (docs/algorithm.md §7).

Mixing with these weights is exactly Bayesian model averaging: the mixture's
probability of the whole text is `sum_i prior_i * P_i(text)`, so its log-loss exceeds
the best member's by at most `-log prior_best` (log N with equal priors), whatever the
text. That needs every member's probability of the *same* pieces, which lossless
reduction gives across tokenizers; token-level ensembles cannot compute it.

With a switching rate a > 0 the weights follow the fixed-share rule (Herbster and
Warmuth, 1998): after each update a fraction a of the weight is spread evenly over the
members, so a member that starts predicting better (a code block inside prose) regains
weight in a few pieces instead of after as many as it lost it over. The price is at
most `-log(1 - a)` nats per piece against the best single member.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lvr_local.core.logspace import logsumexp_array
from lvr_local.errors import LvrError


class Posterior:
    """Normalised weights over members; members with prior 0 stay at 0."""

    def __init__(self, prior: Sequence[float], switch_rate: float = 0.0) -> None:
        if not 0.0 <= switch_rate < 1.0:
            raise LvrError(f"switch_rate must be in [0, 1), got {switch_rate}")
        self.switch_rate = switch_rate
        self.reset(prior)

    def reset(self, prior: Sequence[float]) -> None:
        p = np.asarray(prior, dtype=np.float64)
        if np.any(p < 0) or not p.sum() > 0:
            raise LvrError("the bayes rule needs non-negative weights with a positive sum")
        with np.errstate(divide="ignore"):
            self._log = np.log(p / p.sum())

    @property
    def weights(self) -> np.ndarray:
        top = np.max(self._log)
        w = np.exp(self._log - top)
        return w / w.sum()

    def update(self, logq: np.ndarray) -> None:
        """Condition on one more piece: `logq[i]` is member i's log-probability of it
        (-inf for a member that cannot spell it, or has left)."""
        log = self._log + np.asarray(logq, dtype=np.float64)
        if not np.isfinite(np.max(log)):
            return  # no member could spell it: keep the weights (the ensemble refuses it)
        log -= logsumexp_array(log)
        if self.switch_rate > 0:
            alive = np.isfinite(log)
            share = self.switch_rate / int(alive.sum())
            w = np.exp(log)
            with np.errstate(divide="ignore"):
                log = np.where(alive, np.log((1 - self.switch_rate) * w + share), -np.inf)
        self._log = log
