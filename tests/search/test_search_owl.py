"""OWL layerwise sparsities."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaflex.search.errors import BudgetInfeasible
from adaflex.search.owl import outlier_ratio, owl_from_scores, owl_sparsities


def test_paper_formula_equal_sizes():
    lod = np.array([0.01, 0.03, 0.02, 0.05])
    s = owl_sparsities(lod, 0.7, lam=0.08)
    D = (lod - 0.01) / 0.04 * 0.16
    assert np.allclose(s, 1 - (D - D.mean() + 0.3))
    assert s.mean() == pytest.approx(0.7)
    assert np.argmin(s) == 3 and np.argmax(s) == 0  # most outliers -> pruned least
    assert s.max() - s.min() == pytest.approx(0.16)


def test_equal_lod_is_uniform():
    assert np.allclose(owl_sparsities([0.02] * 5, 0.5), 0.5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 0.2), min_size=1, max_size=8),
    st.floats(0, 0.95),
    st.floats(0, 0.6),
    st.data(),
)
def test_weighted_mean_and_clip(lod, target, lam, data):
    sizes = np.array([data.draw(st.floats(0.5, 10)) for _ in lod])
    s = owl_sparsities(lod, target, lam=lam, sizes=sizes, max_sparsity=0.99)
    assert np.all(s >= 0) and np.all(s <= 0.99)
    assert np.average(s, weights=sizes) == pytest.approx(target, abs=1e-9)
    # order is kept: more outliers never means more sparsity
    order = np.argsort(lod, kind="stable")
    assert np.all(np.diff(s[order]) <= 1e-12)


def test_clipping_keeps_the_mean():
    s = owl_sparsities([0.0, 0.0, 0.0, 1.0], 0.95, lam=0.5)
    assert s.max() <= 0.99 and s.min() >= 0
    assert s.mean() == pytest.approx(0.95)


def test_infeasible_and_bad_inputs():
    with pytest.raises(BudgetInfeasible) as err:
        owl_sparsities([0.1, 0.2], 0.995)
    assert err.value.cheapest == 0.99
    with pytest.raises(ValueError):
        owl_sparsities([0.1, 0.2], 1.0)
    with pytest.raises(ValueError):
        owl_sparsities([0.1, 0.2], 0.5, lam=-1)
    with pytest.raises(ValueError):
        owl_sparsities([0.1, 0.2], 0.5, sizes=[1, 0])


def test_outlier_ratio_pools_linears():
    a = np.ones(8)
    b = np.array([1.0, 1.0, 100.0, 1.0])
    # pooled mean = 111 / 12 = 9.25; threshold 46.25: only the 100 is an outlier
    assert outlier_ratio([a, b]) == pytest.approx(1 / 12)
    assert outlier_ratio(a) == 0.0
    assert outlier_ratio(np.concatenate([a, b]), m=5) == pytest.approx(1 / 12)


def test_owl_from_scores_uses_counts_as_sizes():
    rng = np.random.default_rng(0)
    calm = rng.random((3, 40))
    spiky = rng.random(200)
    spiky[:10] = 1000
    s = owl_from_scores([calm, [spiky[:100], spiky[100:]]], 0.6, lam=0.1)
    assert s[1] < s[0]
    assert np.average(s, weights=[120, 200]) == pytest.approx(0.6)
