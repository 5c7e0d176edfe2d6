"""Sums of probabilities kept as logarithms: the one place logsumexp is written.

The rule, for every function here: the largest term is factored out before the exp, so
it contributes exactly 1 and no term that matters underflows. A term more than about
745 nats below the largest contributes 0 (float64's exp underflows there), which moves
the sum by less than 1e-300 relative. No terms, or only -inf terms, sum to -inf
(probability 0), never NaN. NaN or +inf terms are the caller's to refuse first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NEG_INF = float("-inf")
# Below about -745, exp underflows to 0 in float64: a shared shift is safe for values
# that all lie within this range of the largest.
ONE_SHIFT_RANGE = 700.0


def log1mexp(x: float) -> float:
    """log(1 - exp(x)) for x <= 0: the log of the mass left when log-mass x is taken."""
    return math.log(-math.expm1(x)) if x < 0.0 else NEG_INF


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(values))) of a few Python floats, summed exactly (math.fsum)."""
    if not values:
        return NEG_INF
    top = max(values)
    if top == NEG_INF:
        return NEG_INF
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def logsumexp_array(x: np.ndarray) -> float:
    """log(sum(exp(x))) of a 1-D float array (numpy's pairwise sum: vectorised)."""
    if x.size == 0:
        return NEG_INF
    top = float(x.max())
    if top == NEG_INF:
        return NEG_INF
    return top + math.log(float(np.exp(x - top).sum()))


def logsumexp_columns(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x), axis=0)) of a 2-D array: one logsumexp per column."""
    top = np.max(x, axis=0)
    shift = np.where(top > NEG_INF, top, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(x - shift), axis=0)) + shift


def grouped_logsumexp(group: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The group ids (integers >= 0) that have values, in order, and the logsumexp of
    each one's values. One shift for all when no value lies more than ONE_SHIFT_RANGE
    below the largest (one pass, no sort: the common case), else each group shifted by
    its own largest value, so that a group far below another loses nothing."""
    top = float(values.max())
    if float(values.min()) - top > -ONE_SHIFT_RANGE:
        sums = np.bincount(group, weights=np.exp(values - top))
        groups = np.flatnonzero(sums)
        return groups, np.log(sums[groups]) + top
    groups, index = np.unique(group, return_inverse=True)
    tops = np.full(len(groups), NEG_INF)
    np.maximum.at(tops, index, values)
    shift = np.where(tops > NEG_INF, tops, 0.0)
    sums = np.bincount(index, weights=np.exp(values - shift[index]), minlength=len(groups))
    with np.errstate(divide="ignore"):
        return groups, np.log(sums) + shift
