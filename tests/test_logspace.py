"""The log-space sums every other module uses (core/logspace.py), against the plain
formula where it is exact and against hand-worked values where it would underflow."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lvr_local.core.logspace import (
    grouped_logsumexp,
    log1mexp,
    logsumexp,
    logsumexp_array,
    logsumexp_columns,
)

INF = math.inf


def plain(values: list[float]) -> float:
    """The textbook formula, exact enough for values near 0."""
    total = sum(math.exp(v) for v in values)
    return math.log(total) if total > 0 else -INF


@pytest.mark.parametrize("seed", range(5))
def test_the_sums_agree_with_the_plain_formula_on_moderate_values(seed: int) -> None:
    values = np.random.default_rng(seed).normal(-5.0, 3.0, 40)
    expected = plain(values.tolist())
    assert logsumexp(values.tolist()) == pytest.approx(expected, abs=1e-12)
    assert logsumexp_array(values) == pytest.approx(expected, abs=1e-12)
    columns = logsumexp_columns(values.reshape(8, 5))
    for j in range(5):
        assert columns[j] == pytest.approx(plain(values.reshape(8, 5)[:, j].tolist()), abs=1e-12)


def test_far_below_exp_s_range_nothing_underflows() -> None:
    """exp(-1000) is 0 in float64; the shifted sums still see every term."""
    values = [-1000.0, -1000.0, -1000.0 - math.log(2)]
    expected = -1000.0 + math.log(2.5)
    assert plain(values) == -INF  # what the textbook formula gives
    assert logsumexp(values) == pytest.approx(expected, abs=1e-12)
    assert logsumexp_array(np.array(values)) == pytest.approx(expected, abs=1e-12)
    assert logsumexp_columns(np.array([values]).T)[0] == pytest.approx(expected, abs=1e-12)


def test_no_terms_or_only_impossible_ones_sum_to_minus_infinity_not_nan() -> None:
    assert logsumexp([]) == -INF and logsumexp([-INF, -INF]) == -INF
    assert logsumexp_array(np.array([])) == -INF
    assert logsumexp_array(np.array([-INF, -INF])) == -INF
    columns = logsumexp_columns(np.array([[-INF, 0.0], [-INF, 0.0]]))
    assert columns[0] == -INF and columns[1] == pytest.approx(math.log(2))
    assert logsumexp([-INF, 1.5]) == 1.5


@pytest.mark.parametrize("spread", [3.0, 2000.0])
def test_grouped_sums_match_one_sum_per_group(spread: float) -> None:
    """Both ways: one shift for all (values close together) and one per group (a group
    far below the rest, which a shared shift would flush to zero)."""
    rng = np.random.default_rng(1)
    group = rng.integers(0, 6, 60)
    group[group == 4] = 5  # group 4 has no value: it is left out
    values = rng.normal(0.0, 1.0, 60) - spread * (group == 2)
    groups, sums = grouped_logsumexp(group, values)
    assert groups.tolist() == [0, 1, 2, 3, 5]
    for g, s in zip(groups, sums, strict=True):
        assert s == pytest.approx(logsumexp(values[group == g].tolist()), abs=1e-12)


def test_log1mexp_is_the_log_of_what_is_left() -> None:
    assert log1mexp(math.log(0.25)) == pytest.approx(math.log(0.75), abs=1e-15)
    assert log1mexp(-1e-20) == pytest.approx(math.log(1e-20), rel=1e-12)  # no cancellation
    assert log1mexp(0.0) == -INF
