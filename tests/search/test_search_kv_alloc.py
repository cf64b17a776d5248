"""Per-layer KV budget allocators."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaflex.search import kv_alloc as kv
from adaflex.search.errors import BudgetInfeasible


@st.composite
def layers(draw):
    L = draw(st.integers(1, 8))
    lengths = np.array([draw(st.integers(0, 60)) for _ in range(L)])
    prefs = np.array([draw(st.sampled_from([0.0, 0.1, 1.0, 2.5, 7.0])) for _ in range(L)])
    total = draw(st.integers(0, int(lengths.sum())))
    return prefs, lengths, total


@settings(max_examples=80, deadline=None)
@given(layers())
def test_cake_sum_caps_and_quota(case):
    prefs, lengths, total = case
    b = kv.cake(prefs, total, lengths)
    assert b.dtype == np.int64 and b.sum() == total
    assert np.all(b >= 0) and np.all(b <= lengths)
    share = kv.water_fill(prefs, total, np.zeros(len(prefs)), lengths)
    assert share.sum() == pytest.approx(total)
    assert np.all(np.abs(b - share) < 1)  # every count is the floor or the ceiling of its share
    # proportional wherever no cap binds: equal preference, neither capped -> within one token
    free = (b < lengths) & (prefs > 0)
    if free.sum() >= 2 and prefs[free].min() > 0:
        ratio = share[free] / prefs[free]
        assert np.allclose(ratio, ratio[0])


@settings(max_examples=60, deadline=None)
@given(layers())
def test_monotone_in_total(case):
    prefs, lengths, total = case
    if total == lengths.sum():
        return
    lo = np.zeros(len(prefs))
    a, b = kv.water_fill(prefs, total, lo, lengths), kv.water_fill(prefs, total + 1, lo, lengths)
    assert np.all(b >= a - 1e-9)  # real shares never decrease
    ia, ib = kv.cake(prefs, total, lengths), kv.cake(prefs, total + 1, lengths)
    assert np.all(ib >= ia - 1)  # largest remainder: at most one token moves (Alabama paradox)
    assert ib.sum() == ia.sum() + 1
    ua, ub = kv.uniform(len(prefs), total, lengths), kv.uniform(len(prefs), total + 1, lengths)
    assert np.all(ub >= ua)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 5000), st.floats(1, 50))
def test_pyramid(L, total, beta):
    b = kv.pyramid(L, total, beta=beta)
    assert b.sum() == total
    assert np.all(np.diff(b) <= 1)  # falls with depth (up to the rounding token)
    assert np.all(b >= 0)


def test_pyramid_schedule_and_caps():
    assert kv.pyramid(6, 600).tolist() == [195, 157, 119, 81, 43, 5]
    assert kv.pyramid(4, 400, beta=1).tolist() == [100] * 4
    b = kv.pyramid(4, 400, lengths=150)
    assert b.sum() == 400 and b.max() <= 150


def test_uniform():
    assert kv.uniform(5, 17).tolist() == [4, 4, 3, 3, 3]
    assert kv.uniform(3, 10, lengths=[2, 50, 50]).tolist() == [2, 4, 4]
    assert kv.uniform(3, 9, min_keep=2).tolist() == [3, 3, 3]


def test_cake_spreads_the_excess():
    assert kv.cake([1, 2, 3, 0], 100, [10, 100, 100, 100]).tolist() == [10, 36, 54, 0]
    assert kv.cake([0, 0, 0], 9, [5, 5, 5]).tolist() == [3, 3, 3]  # no preference: uniform
    # weighted layers full: the zero-preference layer takes the rest
    assert kv.cake([1, 1, 0], 14, [5, 5, 10]).tolist() == [5, 5, 4]
    assert kv.cake([1, 3], 8, None).tolist() == [2, 6]
    assert kv.cake([1, 1, 1], 6, [10, 10, 10], min_keep=[4, 0, 0]).tolist() == [4, 1, 1]


def test_budget_errors():
    with pytest.raises(ValueError):
        kv.cake([1, 1], 30, [10, 10])
    with pytest.raises(BudgetInfeasible) as err:
        kv.uniform(3, 5, lengths=10, min_keep=2)
    assert err.value.cheapest == 6
    with pytest.raises(ValueError):
        kv.cake([1, -1], 3, [5, 5])
    with pytest.raises(ValueError):
        kv.uniform(2, 3.5)


def test_cake_preference():
    H, V = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    assert np.allclose(kv.cake_preference(H, V), [9.0, 4.0])
    assert np.allclose(kv.cake_preference(H, V, tau1=2.0, tau2=2.0), [3.0, 2.0])
    with pytest.raises(ValueError):
        kv.cake_preference(H, V, tau1=0)


def test_cumulative_mass():
    c = kv.cumulative_mass([1.0, 3.0, 0.0, 4.0])
    assert np.allclose(c, [0.5, 0.875, 1.0, 1.0])
    assert np.allclose(kv.cumulative_mass(np.zeros(4)), [0.25, 0.5, 0.75, 1.0])


def test_prefixkv_shared_threshold():
    # flat attention: c_l(k) = k / N_l, so one threshold p keeps the same fraction everywhere
    curves = [np.arange(1, 11) / 10, np.arange(1, 21) / 20]
    assert kv.prefixkv(curves, 15, tol=0).tolist() == [5, 10]
    # peaked layer 0 reaches any mass with few keys, flat layer 1 needs many
    peaked = kv.cumulative_mass([100.0] + [1.0] * 19)
    flat = kv.cumulative_mass(np.ones(20))
    b = kv.prefixkv([peaked, flat], 12)
    assert b.sum() == 12 and b[0] < b[1]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**16), st.data())
def test_prefixkv_properties(L, seed, data):
    rng = np.random.default_rng(seed)
    curves = [kv.cumulative_mass(rng.random(rng.integers(5, 40)) ** 6) for _ in range(L)]
    lengths = np.array([c.size for c in curves])
    floor = data.draw(st.integers(0, 4))
    lo = np.minimum(floor, lengths)
    total = data.draw(st.integers(int(lo.sum()), int(lengths.sum())))
    b = kv.prefixkv(curves, total, min_keep=floor)
    assert b.sum() == total
    assert np.all(b <= lengths) and np.all(b >= lo)


def test_prefixkv_floor_and_errors():
    peaked = kv.cumulative_mass([1000.0] + [1.0] * 29)
    flat = kv.cumulative_mass(np.ones(30))
    starved = kv.prefixkv([peaked, flat], 10)
    assert starved[0] <= 2  # the plain method starves the peaked layer
    assert kv.prefixkv([peaked, flat], 10, min_keep=4)[0] >= 4
    with pytest.raises(BudgetInfeasible):
        kv.prefixkv([peaked, flat], 5, min_keep=4)
    with pytest.raises(ValueError):
        kv.prefixkv([peaked, flat], 61)
    with pytest.raises(ValueError):
        kv.prefixkv([np.array([0.5, 0.2])], 1)


def test_round_to_total():
    assert kv.round_to_total([1.5, 1.5, 1.0], 4).tolist() == [2, 1, 1]
    assert kv.round_to_total([2.6, 0.4], 3, hi=[2, 5]).tolist() == [2, 1]
    with pytest.raises(ValueError):
        kv.round_to_total([1.0, 1.0], 5, hi=[2, 2])


def test_average_plans_and_counts():
    plan = kv.average_plans([[0.2, 0.4], [0.4, 0.2], [0.3, 0.3]])
    assert np.allclose(plan, [0.3, 0.3])
    assert np.allclose(kv.average_plans([[0.0], [1.0]], weights=[3, 1]), [0.25])
    with pytest.raises(ValueError):
        kv.average_plans([[0.1, 0.2], [0.1]])
    with pytest.raises(ValueError):
        kv.average_plans([[1.5]])
    counts = kv.plan_counts([0.1, 0.3, 0.2], 100)
    assert counts.tolist() == [10, 30, 20]
    counts = kv.plan_counts([0.1, 0.9, 0.2], 50, total=40)
    assert counts.sum() == 40 and counts.max() <= 50


def test_promote_ranks_by_gain_and_keeps_the_mean():
    gains = np.array([0.0, 0.3, -0.1, 0.5, 0.2, 0.1])
    f = kv.promote(gains, 0.4, 0.12, [(1, 1.0), (2, 0.5)])
    assert f[3] == 1.0 and f[1] == 0.5 and f[4] == 0.5  # largest gain first, then the next two at half
    rest = (6 * 0.4 - 2.0) / 3
    assert np.allclose(f[[0, 2, 5]], rest) and f.mean() == pytest.approx(0.4)
    assert kv.promote(gains, 0.4, 0.12, [(2, 1.0)]) is None  # the other four would keep 0.1, below the floor
    assert kv.promote(gains, 0.9, 0.0, [(1, 0.5)]) is None  # the others would keep more than the promoted one
    with pytest.raises(ValueError, match="tiers"):
        kv.promote(gains, 0.25, 0.0, [(6, 0.3)])


@given(st.integers(4, 30), st.floats(0.05, 0.6), st.integers(0, 10**6))
@settings(max_examples=60, deadline=None)
def test_promotion_plans_are_feasible_and_promote_only_positive_gains(n, mean, seed):
    rng = np.random.default_rng(seed)
    gains = rng.normal(size=n)
    floor = mean / 3
    plans = kv.promotion_plans(gains, mean, floor)
    positive = set(np.flatnonzero(gains > 0).tolist())
    for name, f in plans.items():
        assert f.mean() == pytest.approx(mean) and f.min() >= floor - 1e-9 and f.max() <= 1.0
        raised = set(np.flatnonzero(f > f.min() + 1e-12).tolist())
        assert raised <= positive, name
        assert sum(int(part[3:part.index("@")]) for part in name.split("+")) == len(raised)


def test_promotion_plans_with_sizes_and_no_pairs():
    gains = np.zeros(40)
    gains[[3, 7, 11, 20]] = [0.4, 0.3, 0.2, 0.1]
    plans = kv.promotion_plans(gains, 0.25, 0.05, pairs=0, sizes=(1, 3, 8))
    # only the counts asked for, and never more than the 4 units of positive gain
    assert sorted(plans) == ["top1@0.5", "top1@1", "top3@0.5", "top3@1"]
    assert set(np.flatnonzero(plans["top3@1"] == 1.0)) == {3, 7, 11}
