"""Combining the members' next-piece distributions into one (docs/algorithm.md §7).

Inputs are log-probabilities over the same sub-vocabulary (END last), one row per
model; a piece impossible for a model is -inf there. Outputs are normalised
log-probabilities; no NaN ever leaves this module.

The rules are stateless: `bayes` mixes like `mean`, with weights (the posterior) that
the caller keeps up to date (posterior.py). `mixing_weights` turns the members'
configured weights into the ones a rule uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lvr_local.core.logspace import logsumexp_array, logsumexp_columns
from lvr_local.errors import LvrError

RULES = ("mean", "product", "max", "bayes")


@dataclass(frozen=True)
class Mixing:
    """How members combine: the rule; whether product exponents are calibrated (scaled
    so that the positive ones sum to 1: a weighted geometric mean, no sharper than its
    members); bayes's switching rate (0: the plain posterior; > 0: fixed share); and how
    strongly base members defer to a sure chat member (0: not at all; `deferred`)."""

    rule: str = "mean"
    calibrate: bool = True
    switch_rate: float = 0.0
    defer: float = 0.0


class NoPieceError(LvrError):
    """Every piece is impossible under the combined distribution: under the product, the
    members' supports do not meet (in practice pruning's doing: their kept branches
    continue the text in different ways). The ensemble can then let the chat members
    take the step alone (decoding/ensemble.py, `Ensemble.combined`)."""

    def __init__(self) -> None:
        super().__init__("no piece is possible under the combined distribution")


def mixing_weights(weights: Sequence[float], mixing: Mixing) -> np.ndarray:
    """The weights `combine` gets: normalised to sum 1 for mean, max and bayes (the
    prior), where scale does not matter; product exponents divided by the sum of the
    positive ones when calibrated (a negative exponent keeps its ratio to them), as
    given otherwise."""
    w = np.asarray(weights, dtype=np.float64)
    if mixing.rule == "product":
        positive = float(w[w > 0].sum())
        return w / positive if mixing.calibrate and positive > 0 else w
    total = float(w.sum())
    return w / total if total > 0 else w


def deferred(
    weights: Sequence[float], logq: np.ndarray, leads: Sequence[bool], power: float
) -> np.ndarray:
    """The configured weights for one step, each follower's (a row not in `leads`)
    scaled by the leads' doubt, `(1 - c) ** power`, where c is the surest lead's
    probability of its likeliest piece (docs/algorithm.md §7.6). A base model beside a
    chat model then speaks where the chat model hesitates and falls silent where it is
    sure, instead of pulling it off its course with the same say at every piece.
    Unchanged with power 0, with no lead or no follower."""
    w = np.asarray(weights, dtype=np.float64).copy()
    leads = np.asarray(leads, dtype=bool)
    if power <= 0 or not leads.any() or leads.all():
        return w
    sure = float(np.exp(np.max(logq[leads])))
    w[~leads] *= max(0.0, 1.0 - sure) ** power  # a row's top may round a hair above 1
    return w


# A negative weight rewards pieces the model finds unlikely; an impossible piece would
# get +inf. Its log-probability is floored here instead (e^-50 ~ 2e-22).
NEGATIVE_WEIGHT_FLOOR = -50.0


def log_normalise(scores: np.ndarray) -> np.ndarray:
    """Log-scores shifted so that their probabilities sum to 1 (the product and max rules
    give unnormalised scores); an error when every piece scores -inf."""
    if not np.isfinite(np.max(scores)):
        raise NoPieceError()
    return scores - logsumexp_array(scores)


def combine(
    logq: np.ndarray,
    weights: Sequence[float],
    rule: str,
    can_end: Sequence[bool] | None = None,
) -> np.ndarray:
    """Combined log-distribution of a (n_models, n_pieces) array of log q_i, END last.

    `can_end` marks the rows that can signal the end of a turn (None: all). When some
    cannot (a base model in a chat), END's probability comes from those that can,
    combined by the rule, and every other piece from all rows conditioned on not
    ending, renormalised: p(END) = e, p(s) = (1 - e) * rule_i(q_i(s | not END))."""
    w = np.asarray(weights, dtype=np.float64)
    if logq.ndim != 2 or logq.shape[0] != len(w):
        raise ValueError("one row of log-probabilities per weight")
    if can_end is not None and 0 < sum(map(bool, can_end)) < len(w):
        return _turn_end(logq, w, rule, np.asarray(can_end, dtype=bool))
    return _rule(logq, w, rule)


def _turn_end(logq: np.ndarray, w: np.ndarray, rule: str, can_end: np.ndarray) -> np.ndarray:
    end = logq.shape[1] - 1
    w_end = w[can_end]
    if rule == "product":  # as sharp as the whole product: same sum of positive exponents
        positive = float(w_end[w_end > 0].sum())
        w_end = w_end * (float(w[w > 0].sum()) / positive) if positive > 0 else w_end
    p_end = float(np.exp(_rule(logq[can_end], w_end, rule)[end]))
    with np.errstate(divide="ignore"):
        log_stay = np.log1p(-np.exp(logq[:, end]))  # log(1 - q_i(END))
    rows = np.isfinite(log_stay)  # a row certain to end says nothing about what follows
    out = np.full(logq.shape[1], -np.inf)
    if p_end >= 1.0 or not rows.any():
        out[end] = 0.0
        return out
    conditional = logq[rows] - log_stay[rows, None]
    conditional[:, end] = -np.inf
    out[:] = _rule(conditional, w[rows], rule) + np.log1p(-p_end)
    with np.errstate(divide="ignore"):
        out[end] = np.log(p_end)
    return out


def _rule(logq: np.ndarray, w: np.ndarray, rule: str) -> np.ndarray:
    if rule in ("mean", "bayes"):
        return _mean(logq, w)
    if rule == "product":
        return _product(logq, w)
    if rule == "max":
        return _max(logq, w)
    raise LvrError(f"unknown combination rule '{rule}': expected one of {', '.join(RULES)}")


def check_weights(rule: str, weights: Sequence[float]) -> None:
    """Refuse weights `rule` cannot combine with, so that a front end can say so when
    they are set rather than at every piece after. A weight that is not a finite number
    is left to the runner's check of each value (runner/config.py, `check_weights`),
    which names it."""
    w = np.asarray(weights, dtype=np.float64)
    if rule in ("mean", "bayes") and (np.any(w < 0) or w.sum() <= 0):
        raise LvrError(f"the {rule} rule needs non-negative weights with a positive sum")
    if rule == "max" and np.any(w < 0):
        raise LvrError("the max rule needs non-negative weights")
    if rule == "product" and np.all(np.isfinite(w)) and not np.any(w > 0):
        raise LvrError("the product rule needs at least one positive weight")


def _mean(logq: np.ndarray, w: np.ndarray) -> np.ndarray:
    check_weights("mean", w)
    active = w > 0
    rows = logq[active]
    if len(rows) == 1:  # one model: its own distribution (rows are normalised)
        if not np.isfinite(np.max(rows[0])):
            raise NoPieceError()
        return rows[0]
    weights = w[active] / w[active].sum()
    # In probability space: one exp per entry, no per-piece maximum (the step's serial
    # part while the models wait). float64 keeps every q above ~1e-308.
    mixed = weights @ np.exp(rows)
    total = float(mixed.sum())
    if not total > 0.0:
        raise NoPieceError()
    with np.errstate(divide="ignore"):
        out = np.log(mixed / total)
    _repair_underflow(out, rows, np.log(weights) - np.log(total))
    return out


def _repair_underflow(out: np.ndarray, rows: np.ndarray, log_scale: np.ndarray) -> None:
    """Pieces whose every probability underflowed exp (below ~1e-308) but is not zero:
    their log-mixture, computed in log space."""
    zero = np.flatnonzero(out == -np.inf)
    if len(zero) == 0:
        return
    out[zero] = logsumexp_columns(rows[:, zero] + log_scale[:, None])


def _product(logq: np.ndarray, w: np.ndarray) -> np.ndarray:
    total = np.zeros(logq.shape[1])
    for row, weight in zip(logq, w, strict=True):
        if weight > 0:
            total += weight * row  # -inf stays -inf: a model's veto
        elif weight < 0:
            total += weight * np.maximum(row, NEGATIVE_WEIGHT_FLOOR)
    return log_normalise(total)


def _max(logq: np.ndarray, w: np.ndarray) -> np.ndarray:
    check_weights("max", w)
    active = w > 0
    with np.errstate(divide="ignore"):
        scaled = logq[active] + np.log(w[active])[:, None]
    return log_normalise(np.max(scaled, axis=0))


def dominant_model(logq: np.ndarray, weights: Sequence[float], piece: int) -> int:
    """The member whose weighted probability of `piece` is largest: who carried the step."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):
        contribution = np.where(w > 0, np.exp(logq[:, piece]) * w, -np.inf)
    return int(np.argmax(contribution))
