"""Dr.LLM MCTS over execution paths, on toy reward functions."""

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaflex.search.mcts import (
    Node,
    PathSearch,
    block_counts,
    child_paths,
    common_prefix_len,
    enrich,
    prefix_reuse,
    search_path,
    select_child,
    ucb,
)


class Counted:
    """Reward wrapper counting real calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, path):
        self.calls += 1
        return self.fn(path)


def skip3(L):
    return lambda p: float(3 not in p and len(p) <= L - 1)


def test_finds_the_fix_and_stops_early():
    L = 8
    reward = Counted(skip3(L))
    r = search_path(reward, L, simulations=200, seed=0)
    assert not r.dense_correct and r.dense_reward == 0.0
    assert r.fixed and r.stopped_early
    assert 3 not in r.label and len(r.label) <= L - 1
    assert r.counts[3] == 0 and r.counts == block_counts(r.label, L)
    assert r.simulations < 200
    assert reward.calls == r.evaluations == len(set(r.evaluated))
    assert r.evaluated[0] == tuple(range(L)) == r.dense_path


def test_deterministic_by_seed():
    runs = [search_path(skip3(8), 8, simulations=40, early_stop=False, seed=s) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0].evaluated != runs[2].evaluated


def test_early_stop_on_saving_two_blocks():
    L = 6
    r = search_path(lambda p: 1.0, L, simulations=500, seed=0)
    assert r.dense_correct and r.stopped_early and not r.fixed
    assert len(r.evaluated[-1]) <= L - 2  # stopped right after the first path two blocks shorter
    assert all(len(p) > L - 2 for p in r.evaluated[:-1])
    full = search_path(lambda p: 1.0, L, simulations=30, early_stop=False, seed=0)
    assert full.simulations == 30 and not full.stopped_early


def test_dense_label_when_nothing_shorter_is_correct():
    L = 5
    r = search_path(lambda p: float(p == tuple(range(L))), L, simulations=60, seed=0)
    assert r.label == tuple(range(L)) and r.counts == (1,) * L
    assert not r.fixed and r.simulations == 60 and r.saved_blocks == 0


def test_no_correct_path():
    r = search_path(lambda p: 0.0, 4, simulations=20, seed=0)
    assert r.label is None and r.counts is None and not r.fixed and r.label_reward is None


@pytest.mark.parametrize("max_len", [None, 4])
def test_execution_cap(max_len):
    L = 3
    cap = 2 * L if max_len is None else max_len
    # reward favours long paths, so the tree is pushed against the cap
    r = search_path(
        lambda p: len(p) / (2 * L),
        L,
        simulations=300,
        lam=0.0,
        c=0.1,
        early_stop=False,
        max_len=max_len,
        seed=3,
    )
    assert max(len(p) for p in r.evaluated) == cap
    assert all(0 < len(p) <= cap for p in r.evaluated)
    assert all(max(Counter(p).values()) <= 2 for p in r.evaluated)


def test_label_respects_max_executed():
    L = 8
    r = search_path(lambda p: 1.0, L, simulations=200, max_executed=L - 3, seed=0)
    assert len(r.label) <= L - 3
    assert r.stopped_early  # dense (over budget) never stops or labels
    # over-budget paths were evaluated but cannot be labels
    r2 = search_path(lambda p: float(len(p) >= L), L, simulations=50, max_executed=L - 1, seed=0)
    assert r2.label is None and r2.best_reward == 0.0


def test_real_valued_reward_threshold():
    L = 6
    score = lambda p: 0.9 if 2 not in p else 0.4
    r = search_path(score, L, simulations=100, success=0.8, seed=0)
    assert r.fixed and 2 not in r.label and r.label_reward == 0.9 and r.best_reward == 0.9


def test_label_tie_breaks():
    # only paths of length L-1 are correct; delete-two-then-repeat paths have fewer distinct blocks
    L = 4
    r = search_path(lambda p: float(len(p) == L - 1), L, simulations=300, early_stop=False, seed=0)
    correct = [p for p in r.evaluated if len(p) == L - 1]
    assert r.label == min(correct, key=lambda p: (len(p), len(set(p)), p))
    assert len(set(r.label)) == L - 2


def test_single_block_model():
    r = search_path(lambda p: float(p == (0, 0)), 1, simulations=10, seed=0)
    assert r.fixed and r.label == (0, 0) and r.counts == (2,)


@st.composite
def valid_paths(draw):
    L = draw(st.integers(1, 7))
    counts = [draw(st.integers(0, 2)) for _ in range(L)]
    if sum(counts) == 0:
        counts[0] = 1
    return L, tuple(b for b in range(L) for _ in range(counts[b]))


@settings(max_examples=80, deadline=None)
@given(valid_paths())
def test_children_are_legal_and_never_no_ops(case):
    L, path = case
    kids = child_paths(path, L)
    assert len(kids) == len(set(kids))
    for k in kids:
        assert k and k != path
        assert len(k) <= 2 * L and list(k) == sorted(k)
        assert max(Counter(k).values()) <= 2
        d = len(k) - len(path)
        if d < 0:  # a deletion of 1 or 2 consecutive positions
            assert d in (-1, -2)
            i = common_prefix_len(path, k)
            assert path[:i] + path[i - d :] == k
        else:  # a repeat: one block copied right after itself
            assert d == 1
            i = common_prefix_len(path, k)
            assert k[i] == k[i - 1] and k[:i] + k[i + 1 :] == path


def test_children_keep_num_layers():
    # bug fix 1: the released code lost num_layers below the root (normalising by 28)
    root = Node(tuple(range(40)), 40)
    grand = root.add_child(root.untried[0]).add_child((1, 2))
    assert grand.num_layers == 40
    grand.visits, grand.value, grand.parent.visits = 1, 0.0, 1
    assert ucb(grand, c=0.0, lam=3.0) == pytest.approx(-3.0 * 2 / 40)


def test_exploration_uses_parent_visits():
    # bug fix 2: sqrt(ln N_parent / n) with the parent's visits, not the global simulation count
    parent = Node((0, 1, 2), 3)
    parent.visits = 10
    child = parent.add_child((0, 2))
    child.visits, child.value = 2, 1.0
    expect = 0.5 + 1.8 * math.sqrt(math.log(10) / 2) - 3.0 * 2 / 3
    assert ucb(child) == pytest.approx(expect)
    assert ucb(parent.add_child((0, 1))) == math.inf  # unvisited first


def test_select_child_greedy_and_random():
    parent = Node((0, 1, 2), 3)
    parent.visits = 4
    a, b = parent.add_child((0, 1)), parent.add_child((0, 2))
    a.visits, a.value, b.visits, b.value = 2, 0.0, 2, 2.0
    assert select_child(parent, random.Random(0), epsilon=0.0) is b
    picks = {id(select_child(parent, random.Random(s), epsilon=1.0)) for s in range(20)}
    assert picks == {id(a), id(b)}


def test_prefix_reuse_counts():
    paths = [(0, 1, 2, 3), (0, 1, 3), (0, 1, 2, 2, 3)]
    trie = prefix_reuse(paths)
    assert (trie.naive, trie.computed, trie.saved) == (12, 7, 5)
    assert prefix_reuse(paths, mode="last").computed == 8
    paths = [(0, 1, 2), (0, 2), (0, 1, 3)]
    assert prefix_reuse(paths).computed == 5
    assert prefix_reuse(paths, mode="last").computed == 6
    assert prefix_reuse([]).ratio == 0.0
    with pytest.raises(ValueError):
        prefix_reuse(paths, mode="lru")


def test_prefix_reuse_on_a_search():
    r = search_path(skip3(10), 10, simulations=60, early_stop=False, seed=0)
    stats = prefix_reuse(r.evaluated)
    assert stats.naive == sum(len(p) for p in r.evaluated)
    assert stats.computed < stats.naive  # every child shares a prefix with the dense root
    assert prefix_reuse(r.evaluated, mode="last").computed >= stats.computed


def test_common_prefix_len():
    assert common_prefix_len((0, 1, 2), (0, 1, 3)) == 2
    assert common_prefix_len((0, 1), (0, 1, 2)) == 2
    assert common_prefix_len((), (1,)) == 0


def test_enrich():
    recs = [{"label": (0,), "fixed": True}] * 2 + [{"label": (0, 1), "fixed": False} for _ in range(10)]
    recs += [{"label": None, "fixed": False}] * 3
    kept = enrich(recs, 0.3, seed=0)
    fixes = sum(r["fixed"] for r in kept)
    assert fixes == 2 and len(kept) == 2 + 4  # 2 / 6 >= 0.3, 2 / 7 < 0.3
    assert all(r["label"] is not None for r in kept)
    assert [recs.index(r) for r in kept] == sorted(recs.index(r) for r in kept)  # original order
    assert enrich(recs, 0.3, seed=0) == kept  # seeded
    assert len(enrich(recs, 0.0)) == 12
    assert enrich([{"label": (0,), "fixed": False}], 0.3) == []
    # PathSearch records work too
    res = search_path(skip3(6), 6, simulations=50, seed=0)
    assert isinstance(res, PathSearch) and enrich([res]) == [res]


def test_prior_orders_expansion_and_widening_reaches_deep_paths():
    L = 8
    prior = [5.0, 5.0, 5.0, 0.1, 0.2, 5.0, 0.3, 5.0]
    # the first expansion removes the cheapest consecutive pair, then the next cheapest
    r = search_path(lambda p: 1.0, L, simulations=3, early_stop=False, prior=prior, seed=0)
    assert r.evaluated[1] == (0, 1, 2, 5, 6, 7)  # blocks 3 and 4 (cost 0.3) out first
    assert r.evaluated[2] == (0, 1, 4, 5, 6, 7)  # pairs before single blocks: (2, 3) costs 5.1, the next
    # 10 simulations on 23 root children: without widening every path is one action from dense
    flat = search_path(lambda p: 1.0, L, simulations=10, early_stop=False, prior=prior, seed=0)
    assert min(len(p) for p in flat.evaluated) == L - 2
    deep = search_path(lambda p: 1.0, L, simulations=10, early_stop=False, prior=prior, widening=1.0, seed=0)
    assert min(len(p) for p in deep.evaluated) <= L - 4 and len(deep.label) <= L - 4
    # widening alone (random expansion) also descends; a prior of the wrong length is refused
    assert min(len(p) for p in search_path(lambda p: 1.0, L, simulations=10, early_stop=False, widening=1.0,
                                           seed=0).evaluated) <= L - 4
    with pytest.raises(ValueError, match="prior"):
        search_path(lambda p: 1.0, L, prior=[1.0] * 3)
