"""Policies keep the sinks and the recent window, evict padding first, keep spans; allocations respect
the budget and the floors."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.kv.cache import BudgetedCache
from adaflex.retrofit.kv.policies import make_policy, pool
from adaflex.retrofit.kv.spec import KVSpec


def _filled_cache(policy: str, allocation="uniform", budget=0.25, layers=3, rows=2, heads=2, T=64, pad=0, **kw):
    spec = KVSpec(num_layers=layers, policy=make_policy(policy, kernel=kw.pop("kernel", 5)), budget=budget,
                  allocation=allocation, sinks=4, window=8, floor=12, **kw)
    cache = BudgetedCache(spec)
    torch.manual_seed(0)
    for layer in cache.layers:
        k = torch.zeros(rows, heads, T, 4)
        k[..., 0] = torch.arange(T, dtype=torch.float32)  # the key remembers its position
        layer.update(k, k.clone())
        if pad:
            layer.valid[1, :, :pad] = False
    return cache


def _probs(rows, hq, w, T, hot=None):
    logits = torch.randn(rows, hq, w, T)
    if hot is not None:
        logits[..., hot] += 8.0
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "cake"])
def test_every_policy_keeps_sinks_and_window(policy):
    cache = _filled_cache(policy)
    for layer in cache.layers:
        cache.after_attention(layer, _probs(2, 4, 8, 64), groups=2)
        pos = layer.keys[..., 0].long()  # [B, H, K]
        assert layer.stored == 16 and layer.capacity == 16
        for p in list(range(4)) + list(range(56, 64)):
            assert (pos == p).any(-1).all(), (policy, p)
        assert torch.all(pos[..., 1:] > pos[..., :-1])  # chronological order kept
    if policy == "streaming":
        assert cache.layers[0].keys[0, 0, :, 0].long().tolist() == [0, 1, 2, 3] + list(range(52, 64))


def test_scored_policies_keep_the_hot_span():
    for policy in ("snapkv", "cake"):
        cache = _filled_cache(policy, kernel=5, budget=0.3)
        layer = cache.layers[0]
        cache.after_attention(layer, _probs(2, 4, 8, 64, hot=30), groups=2)
        pos = layer.keys[0, 0, :, 0].long().tolist()
        assert {28, 29, 30, 31, 32} <= set(pos), (policy, pos)


def test_padding_goes_first_and_sinks_are_the_first_real_tokens():
    cache = _filled_cache("snapkv", pad=20)
    layer = cache.layers[0]
    cache.after_attention(layer, _probs(2, 4, 8, 64), groups=2)
    pos = layer.keys[1, 0, :, 0].long()
    assert (pos >= 20).all() and {20, 21, 22, 23} <= set(pos.tolist())
    assert bool(layer.valid.all())
    assert layer.kept_lengths().tolist() == [[16, 16], [16, 16]]


def test_pool_is_centred_average():
    x = torch.zeros(1, 1, 9)
    x[..., 4] = 3.0
    y = pool(x, 3)
    assert y[0, 0].tolist() == pytest.approx([0, 0, 0, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("allocation", ["uniform", "pyramid", "cake"])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_allocations_respect_budget_and_floor(allocation, budget):
    cache = _filled_cache("snapkv", allocation=allocation, budget=budget, layers=4, T=200)
    for layer in cache.layers:
        cache.after_attention(layer, _probs(2, 4, 8, 200, hot=layer.layer_idx * 40), groups=2)
    sizes = [layer.stored for layer in cache.layers]
    assert sum(sizes) == round(max(budget * 200, 12)) * 4
    assert min(sizes) >= 12
    if allocation != "uniform":
        assert len(set(sizes)) > 1


def test_static_plan_and_token_budget():
    spec = KVSpec(num_layers=4, policy=make_policy("snapkv"), budget=0.25, fractions=[0.4, 0.3, 0.2, 0.1],
                  sinks=4, window=8, floor=12)
    counts = spec.static_counts(400)
    assert counts.sum() == 400 and counts[0] > counts[-1] and counts.min() >= 12
    spec = KVSpec(num_layers=4, policy=make_policy("snapkv"), budget=None, tokens=50, sinks=4, window=8, floor=12)
    assert spec.static_counts(400).tolist() == [50] * 4
    assert spec.static_counts(30).tolist() == [30] * 4  # nothing to evict yet


def test_h2o_and_mix_keep_heavy_hitters_the_window_ignores():
    # key 20 received most attention over the whole prompt, the window looks at key 40
    mass = torch.full((2, 2, 64), 0.5 / 63)  # mean attention per query: a share of 1 over the keys
    mass[..., 20] = 0.5
    for policy, expect in (("h2o", {20}), ("mix", {20, 38, 39, 40, 41, 42}), ("snapkv", {38, 39, 40, 41, 42})):
        cache = _filled_cache(policy, kernel=5, budget=0.3)
        layer = cache.layers[0]
        layer._fresh = 64
        per_head = mass.repeat_interleave(2, dim=1) * 64  # sums over 64 queries; 2 query heads per KV head
        received = torch.cat([per_head, per_head**2 / 64], 1)  # [B, 2·Hq, K]: sums of p, then of p²
        cache.after_attention(layer, _probs(2, 4, 8, 64, hot=40), groups=2, mass=received)
        pos = set(layer.keys[0, 0, :, 0].long().tolist())
        assert expect <= pos, (policy, sorted(pos))
        assert (20 in pos) == (policy != "snapkv"), (policy, sorted(pos))


def test_received_attention_statistics_rank_keys_differently():
    from adaflex.retrofit.kv.policies import received, value_weight

    # 2 query heads sharing 1 KV head, 3 keys, means over 4 queries of p and p^2:
    # key 0: every query gives it 0.25 (mean 0.25, rms 0.25); key 1: one query gives it 0.8 (mean 0.2, rms 0.4);
    # key 2: only head 1 looks at it (mean over heads 0.15, max 0.3)
    p = torch.tensor([[[0.25] * 4, [0.8, 0, 0, 0], [0, 0, 0, 0]],
                      [[0.25] * 4, [0.8, 0, 0, 0], [0.3] * 4]])  # [Hq=2, K=3, queries=4]
    mass = torch.cat([p.mean(-1), (p * p).mean(-1)], 0)[None]  # [1, 2*Hq, K]
    assert received(mass, 2).argmax().item() == 0
    assert received(mass, 2, stat="rms").argmax().item() == 1
    mean, top = received(mass, 2)[0, 0], received(mass, 2, heads="max")[0, 0]
    assert top[2] > top[0] * 1.1 and mean[2] < mean[0]
    v = torch.ones(1, 1, 3, 4)
    v[..., 1, :] = 0.1  # a key whose value barely moves the output
    w = value_weight(v)
    assert w.shape == (1, 1, 3) and w[0, 0, 1] < 0.2 and w.mean().item() == pytest.approx(1.0)


def test_value_norm_policy_option_reaches_the_score():
    from adaflex.retrofit.kv.apply import spec_from
    from adaflex.retrofit.kv.config import KVConfig

    spec = spec_from(KVConfig(policy="h2o", stat="rms", heads="max", value_norm=True), 4)
    assert (spec.policy.stat, spec.policy.heads, spec.policy.needs_values) == ("rms", "max", True)
    # equal attention everywhere: the value norms decide; the smallest value leaves first
    cache = BudgetedCache(KVSpec(num_layers=1, policy=spec.policy, budget=0.5, sinks=0, window=1, floor=1))
    layer = cache.layers[0]
    k = torch.zeros(1, 1, 8, 4)
    k[..., 0] = torch.arange(8, dtype=torch.float32)
    v = torch.ones(1, 1, 8, 4)
    v[..., 2, :] = 0.01
    layer.update(k, v)
    layer._fresh = 8
    flat = torch.full((1, 2, 8), 1 / 8)  # 2 query heads, 1 KV head: sums of p and p^2 over 8 queries
    cache.after_attention(layer, None, groups=2, mass=torch.cat([flat * 8, flat * flat * 8], 1))
    kept = layer.keys[0, 0, :, 0].long().tolist()
    assert len(kept) == 4 and 2 not in kept
