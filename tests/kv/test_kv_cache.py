"""The budgeted cache: exact at full budget, per-layer masks, chunked scoring, generate() with padding,
real byte savings, replay == live prefill."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adaflex.retrofit.evaluate import cost_figures
from adaflex.retrofit.kv.apply import install, spec_from
from adaflex.retrofit.kv.cache import BudgetedCache
from adaflex.retrofit.kv.config import KVConfig
from adaflex.retrofit.kv.replay import record_prefill, replay
from tiny import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _install(model, **kw):
    kw = {"sinks": 2, "window": 8, **kw}
    spec = spec_from(KVConfig(**kw), model.config.num_hidden_layers)
    install(model, spec)
    return spec


@torch.no_grad()
def test_full_budget_equals_dynamic_cache(model):
    x = torch.randint(0, 250, (2, 70))
    ref = model(x, cache=DynamicCache(config=model.config), use_cache=True).logits
    _install(model, budget=1.0)
    c = model.adaflex.make_cache()
    assert isinstance(c, BudgetedCache)
    out = model(x, cache=c, use_cache=True).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert all(layer.stored == 70 and layer.seen == 70 for layer in c.layers)
    # chunked prefill through the cache == one shot
    c = model.adaflex.make_cache()
    parts = [model(x[:, s:e], cache=c, use_cache=True).logits for s, e in ((0, 31), (31, 32), (32, 70))]
    assert (torch.cat(parts, 1) - ref).abs().max() < 5e-5


@torch.no_grad()
@pytest.mark.parametrize("alloc", ["pyramid", "cake"])
def test_chunked_and_stepwise_scoring_agree_with_layers_of_different_lengths(model, alloc):
    x = torch.randint(0, 250, (2, 90))
    _install(model, budget=0.3, allocation=alloc, policy="snapkv", decode=False)
    one = model.adaflex.make_cache()
    model(x[:, :64], cache=one, use_cache=True)
    lengths = [layer.stored for layer in one.layers]
    assert len(set(lengths)) > 1 and all(n < 64 for n in lengths)
    a = model(x[:, 64:], cache=one, use_cache=True).logits
    step = model.adaflex.make_cache()
    model(x[:, :64], cache=step, use_cache=True)
    b = torch.cat([model(x[:, t:t + 1], cache=step, use_cache=True).logits for t in range(64, 90)], 1)
    chunk = model.adaflex.make_cache()
    model(x[:, :64], cache=chunk, use_cache=True)
    c = torch.cat([model(x[:, s:s + 9], cache=chunk, use_cache=True).logits for s in (64, 73, 82)], 1)[:, :26]
    assert (a - b).abs().max() < 5e-5 and (a - c).abs().max() < 5e-5
    assert [layer.seen for layer in one.layers] == [90] * 4


@torch.no_grad()
def test_replay_equals_live_prefill(model):
    x = torch.randint(0, 250, (2, 80))
    _install(model, budget=1.0)
    rec = record_prefill(model, x[:, :60], window=8)
    sharp = {"stat": "rms", "heads": "max", "value_norm": True}
    for policy, alloc, kw in (("streaming", "pyramid", {}), ("snapkv", "cake", {}), ("cake", "uniform", {}),
                              ("h2o", "uniform", {}), ("mix", "cake", {}), ("h2o", "cake", sharp),
                              ("mix", "uniform", sharp)):
        spec = _install(model, budget=0.3, allocation=alloc, policy=policy, **kw)
        live = model.adaflex.make_cache()
        model(x[:, :60], cache=live, use_cache=True)
        a = model(x[:, 60:], cache=live, use_cache=True).logits
        rep = replay(spec, rec)
        b = model(x[:, 60:], cache=rep, use_cache=True).logits
        assert torch.equal(a, b) and live.peak_bytes == rep.peak_bytes


@torch.no_grad()
def test_generate_batches_with_padding(model):
    a, b = torch.randint(0, 250, (1, 40)), torch.randint(0, 250, (1, 30))
    ids = torch.full((2, 40), 258)
    ids[0], ids[1, 10:] = a[0], b[0]
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :10] = 0
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 258}
    _install(model, budget=1.0)
    g = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(g[0, 40:], model.generate(a, **kw)[0, 40:])
    assert torch.equal(g[1, 40:], model.generate(b, **kw)[0, 30:])
    # compressed: the unpadded row keeps exactly what it keeps alone (counts come from the padded length)
    _install(model, budget=0.4, policy="cake", allocation="pyramid")
    cache = model.adaflex.make_cache()
    g = model.generate(ids, attention_mask=mask, cache=cache, **kw)
    assert torch.equal(g[0, 40:], model.generate(a, **kw)[0, 40:])
    # decoding keeps each layer's size fixed; padding never survives while real tokens are evicted
    assert [layer.stored for layer in cache.layers] == [layer.capacity for layer in cache.layers]
    assert all(layer.seen == 40 + 11 for layer in cache.layers)
    kept = cache.layers[0].kept_lengths()
    assert torch.equal(kept[0], kept[1])  # row 1's padding went first


@torch.no_grad()
def test_generate_uses_budgeted_cache_without_being_asked(model):
    _install(model, budget=0.25, policy="streaming")
    seen = []
    orig = model.adaflex.make_cache

    def factory():
        seen.append(orig())
        return seen[-1]

    model.adaflex.make_cache = factory
    model.generate(torch.randint(0, 250, (1, 64)), max_new_tokens=4, do_sample=False, pad_token_id=258)
    assert seen and all(layer.stored == 16 for layer in seen[0].layers)


@torch.no_grad()
def test_stored_bytes_really_shrink(model):
    probe = torch.randint(0, 250, (2, 128))
    _install(model, budget=1.0)
    assert cost_figures(model, probe)["kv_bytes_ratio"] == pytest.approx(1.0)
    _install(model, budget=0.25, policy="snapkv")
    assert cost_figures(model, probe)["kv_bytes_ratio"] == pytest.approx(0.25)
    _install(model, budget=0.1, policy="cake", allocation="cake")
    c = model.adaflex.make_cache()
    model(probe, cache=c, use_cache=True)
    full = 4 * 2 * 2 * 2 * 128 * 16 * 4  # layers, k+v, rows, kv heads, tokens, head dim, fp32
    assert c.stored_bytes() == pytest.approx(0.1 * full, rel=0.02)
    # cascading keeps the peak near the budget plus one uncompressed layer
    assert c.peak_bytes <= 0.1 * full + full / 4 + 1024


@torch.no_grad()
def test_query_agnostic_freeze_appends_only(model):
    _install(model, budget=0.25, policy="snapkv")
    c = model.adaflex.make_cache()
    model(torch.randint(0, 250, (1, 64)), cache=c, use_cache=True)
    c.frozen = True
    model(torch.randint(0, 250, (1, 5)), cache=c, use_cache=True)
    assert [layer.stored for layer in c.layers] == [21] * 4


@torch.no_grad()
@pytest.mark.parametrize("storage, tokens_kept", [("float16", 0.5), ("int8", 0.25 / ((1 + 4 / 16) / 4))])
def test_storage_types_count_in_the_byte_budget(model, storage, tokens_kept):
    x = torch.randint(0, 250, (2, 128))
    _install(model, budget=1.0)
    ref = model(x, cache=model.adaflex.make_cache(), use_cache=True).logits
    spec = spec_from(KVConfig(budget=0.25, storage=storage, sinks=2, window=8), 4, model=model)
    install(model, spec)
    c = model.adaflex.make_cache()
    out = model(x, cache=c, use_cache=True).logits
    # the prefill already attends over the stored (rounded) values: close to full precision, not equal
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    assert c.layers[0].stored == round(128 * min(1.0, tokens_kept))
    assert cost_figures(model, x)["kv_bytes_ratio"] == pytest.approx(0.25, abs=0.01)
    nxt = model(x[:, :8], cache=c, use_cache=True).logits  # decoding reads the stored (rounded) values
    assert torch.isfinite(nxt).all()


@torch.no_grad()
@pytest.mark.parametrize("decode", [False, True])
def test_eviction_equals_a_masked_full_forward(model, decode):
    """StreamingLLM through the budgeted cache == the plain model with an explicit mask over the whole text.

    Guards positions after eviction, RoPE of kept keys, the lower-right mask alignment, chunked vs
    step-by-step continuation and decode-time eviction: any of them wrong changes the logits."""
    from adaflex.retrofit.kv.apply import uninstall

    x = torch.randint(0, 250, (2, 90))
    uninstall(model)
    # prefill: full causal; then sinks {0, 1} + the last 14 context tokens (16 = 25% of 64)
    m = torch.ones(90, 90, dtype=torch.bool).tril()
    for p in range(64, 90):
        m[p, 2:(64 - 14 if not decode else p - 14)] = False  # decode=True: the window slides token by token
    ref = model(x, attention_mask=m[None, None].expand(2, 1, 90, 90)).logits[:, 64:]
    _install(model, budget=0.25, policy="streaming", decode=decode)
    c = model.adaflex.make_cache()
    model(x[:, :64], cache=c, use_cache=True)
    step = torch.cat([model(x[:, t:t + 1], cache=c, use_cache=True).logits for t in range(64, 90)], 1)
    assert (step - ref).abs().max() < 5e-5
    assert all(layer.seen == 90 and layer.stored == (16 if decode else 16 + 26) for layer in c.layers)
    if not decode:  # one chunk sees what the steps saw
        c = model.adaflex.make_cache()
        model(x[:, :64], cache=c, use_cache=True)
        assert (model(x[:, 64:], cache=c, use_cache=True).logits - ref).abs().max() < 5e-5


@torch.no_grad()
def test_prefix_record_is_the_record_of_the_prefix_alone(model):
    """One prefill of context + question serves both passkey protocols: its prefix record replays like a record
    of the context alone (keys, last-window queries, the mass the context's own queries gave)."""
    x = torch.randint(0, 250, (2, 90))
    _install(model, budget=1.0)
    whole, pre = record_prefill(model, x, window=8, prefix=64)
    alone = record_prefill(model, x[:, :64], window=8)
    assert pre.seen == 64 and whole.seen == 90
    for i in range(4):
        torch.testing.assert_close(pre.keys[i], alone.keys[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(pre.queries[i], alone.queries[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(pre.mass[i], alone.mass[i], atol=1e-4, rtol=0)
        # the whole prompt's mass adds the question's queries on top
        assert bool((whole.mass[i][..., :64] >= pre.mass[i] - 1e-5).all())
        assert not torch.allclose(whole.mass[i][..., :64], pre.mass[i])
    for policy, alloc in (("mix", "cake"), ("h2o", "uniform"), ("snapkv", "pyramid")):
        spec = _install(model, budget=0.3, allocation=alloc, policy=policy)
        a, b = replay(spec, pre), replay(spec, alone)
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.valid, lb.valid) and la.stored == lb.stored
            torch.testing.assert_close(la.keys, lb.keys, atol=1e-5, rtol=0)
        ya = model(x[:, 64:], cache=a, use_cache=True).logits
        yb = model(x[:, 64:], cache=b, use_cache=True).logits
        torch.testing.assert_close(ya, yb, atol=1e-4, rtol=0)


def test_received_attention_split_over_chunks():
    from adaflex.retrofit.kv.attention import received_attention

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 50, 8), torch.randn(2, 2, 50, 8)
    whole = received_attention(q, k, None, 0.3, 2, chunk=256)
    assert whole.shape == (2, 8, 50)
    for split in (0, 16, 23, 50):
        head, total = received_attention(q, k, None, 0.3, 2, chunk=16, split=split)
        torch.testing.assert_close(total, whole, atol=1e-5, rtol=0)
        if split:
            alone = received_attention(q[:, :, :split], k[:, :, :split], None, 0.3, 2)
            torch.testing.assert_close(head[..., :split], alone, atol=1e-5, rtol=0)
        assert bool((head[..., split:] == 0).all())


@pytest.mark.parametrize("padded", [False, True])
def test_received_attention_matches_a_plain_softmax(padded):
    """The chunked, causally cropped, GQA-shared computation == softmax over each query's visible keys, per query
    head: sums of p and of p²."""
    from adaflex.retrofit.kv.attention import lower_right_causal, received_attention, received_mass

    torch.manual_seed(1)
    b, hkv, g, q, k, d = 2, 2, 3, 40, 57, 8  # 40 new queries after 17 cached keys
    query, key = torch.randn(b, hkv * g, q, d), torch.randn(b, hkv, k, d)
    valid = None
    if padded:
        valid = torch.ones(b, 1, k, dtype=torch.bool)
        valid[1, :, :5] = False
    logits = query @ key.repeat_interleave(g, 1).transpose(2, 3) * 0.4
    mask = lower_right_causal(q, k, "cpu")[None, None]
    if valid is not None:
        mask = mask & valid[:, :, None, :]
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    out = received_attention(query, key, valid, 0.4, g, chunk=16)
    torch.testing.assert_close(out, torch.cat([p.sum(2), (p * p).sum(2)], 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received_mass(query, key, valid, 0.4, g, chunk=16),
                               p.sum(2).reshape(b, hkv, g, k).mean(2), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_calibration_objective_runs_a_plan_once(model):
    """A plan met again (the gains' uniform baseline is the search's uniform candidate) is not re-evaluated; the
    same plan at another budget is, and the frozen continuation leaves the figure as a fresh objective gives it."""
    from adaflex.retrofit.kv.apply import CalibrationObjective

    _install(model, budget=1.0)
    windows = torch.randint(0, 250, (2, 96))
    cfg = KVConfig(budget=0.4, policy="mix", sinks=2, window=8, kernel=3)
    obj = CalibrationObjective(model, windows, cfg)
    plan = [0.4, 0.2, 0.6, 0.4]
    first = obj(plan)
    assert obj(list(plan)) == first and obj.calls == 1
    assert obj(plan, budget=0.4) == first and obj.calls == 1  # the stage's own budget, named
    other = obj(plan, budget=0.6)
    assert obj.calls == 2 and other != first
    assert CalibrationObjective(model, windows, cfg)(plan) == pytest.approx(first, rel=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("decode", [False, True])
def test_per_head_plan_equals_a_per_head_masked_full_forward(model, decode):
    """A per-KV-head plan (StreamingLLM, head 0 of each layer keeps 4x what head 1 keeps): each head is stored apart
    (bytes = the kept tokens, no padding) and the logits equal the plain model's with a mask per query head."""
    from adaflex.retrofit.kv.apply import uninstall

    x = torch.randint(0, 250, (2, 90))
    n, groups = model.config.num_hidden_layers, model.config.num_attention_heads // model.config.num_key_value_heads
    spec = spec_from(KVConfig(budget=0.25, policy="streaming", sinks=2, window=4, decode=decode), n,
                     head_fractions=[[0.4, 0.1]] * n)
    counts = spec.static_head_counts(64)
    assert counts.shape == (n, 2) and counts.sum() == 16 * n * 2 and (counts[:, 0] > 3 * counts[:, 1]).all()
    uninstall(model)
    m = torch.ones(4, 90, 90, dtype=torch.bool).tril()
    for q in range(4):  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1
        c = int(counts[0, q // groups])
        for p in range(64, 90):
            m[q, p, 2:(64 - (c - 2) if not decode else p - (c - 2))] = False
    ref = model(x, attention_mask=m[None].expand(2, 4, 90, 90)).logits[:, 64:]
    install(model, spec)
    cache = model.adaflex.make_cache()
    model(x[:, :64], cache=cache, use_cache=True)
    assert all(layer.ragged for layer in cache.layers)
    assert cache.stored_bytes() == 2 * int(counts.sum()) * 2 * 16 * 4  # rows, K and V, head_dim 16, fp32
    step = torch.cat([model(x[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(64, 90)], 1)
    assert (step - ref).abs().max() < 5e-5
    grown = counts if decode else counts + 26
    assert [layer.head_lengths() for layer in cache.layers] == grown.tolist()


@torch.no_grad()
def test_per_head_plan_with_int8_storage_padding_and_beams(model):
    """Heads stored apart also work with int8 storage, left padding in a batch and beam search (row reorders)."""
    n = model.config.num_hidden_layers
    spec = spec_from(KVConfig(budget=0.25, storage="int8", policy="mix", sinks=2, window=8), n, model=model,
                     head_fractions=[[0.1, 0.4]] * n)
    install(model, spec)
    ids = torch.randint(0, 250, (2, 120))
    mask = torch.ones(2, 120, dtype=torch.long)
    ids[1, :20], mask[1, :20] = 258, 0
    cache = model.adaflex.make_cache()
    g = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=258, cache=cache,
                       num_beams=2)
    assert g.shape == (2, 125)
    lengths = [layer.head_lengths() for layer in cache.layers]
    assert all(a < b for a, b in lengths) and lengths == spec.static_head_counts(120).tolist()
    assert cost_figures(model, ids[:1, :100])["kv_bytes_ratio"] == pytest.approx(0.25, abs=0.01)
