"""Combination rules, and sampling over a combined distribution."""

from __future__ import annotations

import numpy as np
import pytest

from lvr_local.core.combine import check_weights, combine, dominant_model
from lvr_local.core.sampling import Sampler, SamplingParams
from lvr_local.errors import LvrError

NEG = -np.inf


def logs(*rows: list[float]) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.array(rows, dtype=np.float64))


def test_mean_is_the_weighted_mixture() -> None:
    q = logs([0.5, 0.5, 0.0], [0.1, 0.0, 0.9])
    p = np.exp(combine(q, [3, 1], "mean"))
    assert np.allclose(p, 0.75 * np.array([0.5, 0.5, 0]) + 0.25 * np.array([0.1, 0, 0.9]))
    # A model with itself at any weights is that model.
    same = logs([0.2, 0.3, 0.5], [0.2, 0.3, 0.5])
    assert np.allclose(np.exp(combine(same, [0.5, 0.5], "mean")), [0.2, 0.3, 0.5])
    # One model (or one with weight): its own row. An all -inf row is an error.
    assert np.array_equal(combine(same, [1, 0], "mean"), same[0])
    with pytest.raises(LvrError, match="no piece is possible"):
        combine(logs([0.0, 0.0]), [1], "mean")


def test_mean_keeps_probabilities_below_float64_exp() -> None:
    # exp(-800) underflows to 0, yet the piece is possible: it keeps its log-probability.
    q = np.array([[0.0, -800.0, NEG], [0.0, -900.0, NEG]])
    out = combine(q, [1, 1], "mean")
    assert out[0] == pytest.approx(0.0, abs=1e-12)
    assert out[1] == pytest.approx(-800.0 + np.log(0.5), abs=1e-9)
    assert out[2] == NEG


def test_product_vetoes_and_negative_weights_stay_finite() -> None:
    q = logs([0.5, 0.5, 0.0], [0.2, 0.4, 0.4])
    p = np.exp(combine(q, [1, 1], "product"))
    assert p[2] == 0 and np.isclose(p.sum(), 1) and np.isclose(p[1] / p[0], 2.0)
    contrast = combine(logs([0.6, 0.4, 0.0], [0.0, 0.5, 0.5]), [1.0, -0.5], "product")
    assert not np.any(np.isnan(contrast)) and np.isclose(np.exp(contrast).sum(), 1)
    assert np.exp(contrast)[0] > 0.6  # the piece the negative model rules out is favoured
    with pytest.raises(LvrError, match="at least one positive weight"):
        check_weights("product", [0.0, -1.0])


def test_max_normalises_the_weighted_maxima_and_bad_weights_or_rules_are_refused() -> None:
    q = logs([0.9, 0.1], [0.2, 0.8])
    p = np.exp(combine(q, [1, 1], "max"))
    assert np.allclose(p, np.array([0.9, 0.8]) / 1.7)
    with pytest.raises(LvrError, match="non-negative"):
        combine(q, [1, -1], "mean")
    with pytest.raises(LvrError, match="unknown combination rule"):
        combine(q, [1, 1], "median")
    assert dominant_model(q, [1, 1], 1) == 1 and dominant_model(q, [1, 1], 0) == 0


def test_greedy_and_seeded_sampling() -> None:
    logp = np.log(np.array([0.1, 0.6, 0.3]))
    assert Sampler(SamplingParams()).choose(logp) == 1
    draws = [Sampler(SamplingParams(temperature=1.0, seed=s)).choose(logp) for s in range(3000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert np.allclose(freq, [0.1, 0.6, 0.3], atol=0.03)
    a = Sampler(SamplingParams(temperature=0.8, seed=7))
    b = Sampler(SamplingParams(temperature=0.8, seed=7))
    assert [a.choose(logp) for _ in range(50)] == [b.choose(logp) for _ in range(50)]


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=2), {1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.55), {1}),
        (SamplingParams(temperature=1.0, top_p=0.85), {1, 2}),
        (SamplingParams(temperature=1.0, min_p=0.4), {1, 2}),
    ],
)
def test_top_k_top_p_and_min_p_leave_only_the_allowed_pieces(
    params: SamplingParams, allowed: set[int]
) -> None:
    logp = np.log(np.array([0.1, 0.6, 0.3]))
    sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": 3}))
    seen = {sampler.choose(logp) for _ in range(400)}
    assert seen == allowed


def test_impossible_pieces_are_never_sampled() -> None:
    logp = np.array([NEG, np.log(0.5), NEG, np.log(0.5)])
    sampler = Sampler(SamplingParams(temperature=2.0, seed=1))
    assert {sampler.choose(logp) for _ in range(200)} == {1, 3}
