"""RD-pruning knapsack DP against brute force on toy curves."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaflex.search.errors import BudgetInfeasible
from adaflex.search.knapsack import additivity_report, allocate, spearman

LEVELS = np.array([0.0, 0.25, 0.5, 0.75])


def brute_force(curves, levels, sizes, budget_kept, drop=None):
    """Exact optimum over every configuration (or None if none fits)."""
    U = len(sizes)
    opts = [
        [(levels[k], curves[u][k]) for k in range(len(levels)) if np.isfinite(curves[u][k])] for u in range(U)
    ]
    if drop is not None:
        for u in range(U):
            if np.isfinite(drop[u]):
                opts[u].append((1.0, drop[u]))
    best = None
    for combo in itertools.product(*opts):
        kept = sum(sizes[u] * (1 - s) for u, (s, _) in enumerate(combo))
        if kept <= budget_kept + 1e-9:
            d = sum(x for _, x in combo)
            best = d if best is None else min(best, d)
    return best


@st.composite
def problems(draw, exact_sizes=True):
    U = draw(st.integers(1, 4))
    curves = np.array([[draw(st.floats(0, 10)) for _ in LEVELS] for _ in range(U)])
    if exact_sizes:  # multiples of 4: every kept count is a whole weight, granularity 1 weight is exact
        sizes = np.array([4 * draw(st.integers(1, 5)) for _ in range(U)], dtype=float)
    else:
        sizes = np.array([draw(st.floats(1, 100)) for _ in range(U)])
    target = draw(st.floats(0, 0.8))
    return curves, sizes, target


@settings(max_examples=60, deadline=None)
@given(problems(exact_sizes=True))
def test_matches_brute_force_when_costs_are_exact(prob):
    curves, sizes, target = prob
    total = sizes.sum()
    budget = (1 - target) * total
    ref = brute_force(curves, LEVELS, sizes, budget)
    if ref is None:
        with pytest.raises(BudgetInfeasible):
            allocate(curves, LEVELS, sizes, target, granularity=1 / total)
        return
    a = allocate(curves, LEVELS, sizes, target, granularity=1 / total)
    assert a.distortion == pytest.approx(ref, abs=1e-9)
    assert a.kept <= budget + 1e-9
    assert a.achieved_sparsity >= target - 1e-12


@settings(max_examples=60, deadline=None)
@given(problems(exact_sizes=False), st.sampled_from([0.01, 0.05]))
def test_rounding_is_safe_and_bounded(prob, gran):
    # exact optimum at the budget <= result <= exact optimum with U steps less budget
    curves, sizes, target = prob
    total = sizes.sum()
    budget = (1 - target) * total
    ref = brute_force(curves, LEVELS, sizes, budget)
    if ref is None:
        with pytest.raises(BudgetInfeasible):
            allocate(curves, LEVELS, sizes, target, granularity=gran)
        return
    a = allocate(curves, LEVELS, sizes, target, granularity=gran)
    assert a.kept <= budget * (1 + 1e-12) + 1e-9  # never over budget in exact weights
    assert np.isclose(a.kept, (sizes * (1 - a.sparsity)).sum())
    assert a.distortion >= ref - 1e-9
    tighter = brute_force(curves, LEVELS, sizes, budget - len(sizes) * gran * total)
    if tighter is not None:
        assert a.distortion <= tighter + 1e-9


@settings(max_examples=40, deadline=None)
@given(problems(exact_sizes=False))
def test_never_worse_than_uniform(prob):
    curves, sizes, _ = prob
    for k, target in enumerate(LEVELS):
        a = allocate(curves, LEVELS, sizes, float(target), granularity=0.05)
        assert a.distortion <= curves[:, k].sum() + 1e-9


@settings(max_examples=40, deadline=None)
@given(problems(exact_sizes=True), st.data())
def test_drop_level_matches_brute_force(prob, data):
    curves, sizes, target = prob
    drop = np.array([data.draw(st.sampled_from([np.inf, 0.5, 3.0, 20.0])) for _ in sizes])
    total = sizes.sum()
    ref = brute_force(curves, LEVELS, sizes, (1 - target) * total, drop=drop)
    if ref is None:
        with pytest.raises(BudgetInfeasible):
            allocate(curves, LEVELS, sizes, target, granularity=1 / total, drop_distortion=drop)
        return
    a = allocate(curves, LEVELS, sizes, target, granularity=1 / total, drop_distortion=drop)
    assert a.distortion == pytest.approx(ref, abs=1e-9)
    assert np.all(a.sparsity[a.dropped] == 1.0)
    assert np.all(np.isfinite(drop[a.dropped]))


def test_drop_competes_with_width():
    # unit 1 is cheap to drop, pruning everyone else hurts: the DP removes it whole
    curves = np.array([[0, 5, 9, 20], [0, 5, 9, 20], [0, 5, 9, 20]], dtype=float)
    a = allocate(curves, LEVELS, [10, 10, 10], 1 / 3, drop_distortion=[np.inf, 0.1, np.inf])
    assert a.dropped.tolist() == [False, True, False]
    assert a.level_index[1] == len(LEVELS)
    assert a.distortion == pytest.approx(0.1)


def test_infeasible_reports_cheapest():
    curves = np.zeros((3, 4))
    with pytest.raises(BudgetInfeasible) as err:
        allocate(curves, LEVELS, [1, 2, 3], 0.6, max_sparsity=0.5)
    assert err.value.cheapest == pytest.approx(0.5)
    assert err.value.requested == 0.6
    assert err.value.exit_code == 3
    # per-unit caps: units can reach 0.75, 0.25, 0.25 -> weighted max (0.75 + 0.5 + 0.25) / 3
    with pytest.raises(BudgetInfeasible) as err:
        allocate(curves, LEVELS, [1, 2, 1], 0.6, max_sparsity=[0.75, 0.25, 0.25])
    assert err.value.cheapest == pytest.approx((0.75 + 0.5 + 0.25) / 4)


def test_unmeasured_levels_are_skipped():
    curves = np.array([[0, np.nan, 1, 2], [0, 0.1, 0.2, 0.3]])
    a = allocate(curves, LEVELS, [4, 4], 0.25, granularity=1 / 8)
    assert a.level_index[0] != 1
    assert a.distortion == pytest.approx(0.2)  # unit 1 goes to 0.5, unit 0 stays dense


def test_target_zero_and_realistic_size():
    rng = np.random.default_rng(0)
    levels = np.linspace(0, 1, 101)
    curves = np.cumsum(rng.random((30, 101)), axis=1) * rng.random((30, 1))
    curves[:, 0] = 0
    assert allocate(curves, levels, np.full(30, 3.54e6), 0.0).distortion == 0.0
    a = allocate(curves, levels, np.full(30, 3.54e6), 0.7)
    assert 0.7 - 1e-12 <= a.achieved_sparsity <= 0.7 + 30 * 1e-4
    assert a.distortion <= curves[:, 70].sum()


def test_bad_inputs():
    with pytest.raises(ValueError):
        allocate(np.zeros((2, 3)), LEVELS, [1, 1], 0.5)
    with pytest.raises(ValueError):
        allocate(np.zeros((2, 4)), LEVELS, [1, 0], 0.5)
    with pytest.raises(ValueError):
        allocate(np.full((2, 4), np.nan), LEVELS, [1, 1], 0.5)


def test_additivity_report():
    r = additivity_report([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 2.0, 9.0])
    assert r.n == 4
    assert r.spearman == pytest.approx(0.8)
    assert (r.chosen_predicted, r.chosen_measured) == (1.0, 1.5)
    assert r.chosen_ratio == pytest.approx(1.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)  # ties get average ranks
    assert math.isnan(spearman([1, 1], [1, 2]))
