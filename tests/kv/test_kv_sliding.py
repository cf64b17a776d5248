"""Sliding windows and attention-logit softcapping under the kv stage (issue 26): with nothing evicted the budgeted
cache gives transformers' own logits (its eager attention, its sliding caches), prefill and greedy decoding; a
sliding layer holds at most window - 1 tokens; with eviction the logits move, but boundedly."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.kv.apply import install, spec_from, uninstall
from adaflex.retrofit.kv.config import KVConfig
from tiny import generated_logits, tiny_family

# 61 byte tokens: well past the tiny families' 16-token window, so a dropped window shows in the logits
TEXT = "The quick brown fox jumps over the lazy dog, then runs home."
WINDOW = 16
CAP = 1.0


def _model(family):
    """The tiny family; Gemma 2's attention logits made large enough for a cap to bend them (at its 50.0 and its
    query_pre_attn_scalar 256, i.e. logits scaled by 1/16 rather than head_dim^-1/2 = 1/4, nothing would show)."""
    model, tok = tiny_family(family)
    if family == "gemma2":
        model.config.attn_logit_softcapping = CAP
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.attn_logit_softcapping = CAP
                block.self_attn.q_proj.weight.mul_(4.0)
                block.self_attn.k_proj.weight.mul_(4.0)
    return model, tok


def _kv(model, **settings):
    install(model, spec_from(KVConfig(**{"sinks": 2, "window": 4, **settings}), model.config.num_hidden_layers,
                             model=model))


def _stored(model, ids):
    cache = model.adaflex.make_cache()
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    return [layer.stored for layer in cache.layers], cache


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_nothing_evicted_gives_transformers_logits(family):
    """budget 1.0: nothing is evicted but what the window hides from every later query."""
    model, tok = _model(family)
    ref = generated_logits(model, tok, TEXT, new_tokens=6)  # transformers: eager attention, its own cache
    _kv(model, budget=1.0)
    got = generated_logits(model, tok, TEXT, new_tokens=6)
    windows = model.adaflex.kv.windows
    assert windows and WINDOW in windows
    ids = tok(TEXT, return_tensors="pt").input_ids
    stored, _ = _stored(model, ids)
    assert stored == [WINDOW - 1 if w else ids.shape[1] for w in windows], stored  # what later queries can see
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    uninstall(model)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
@pytest.mark.parametrize("allocation", ["uniform", "cake"])
def test_the_budget_is_a_share_of_what_the_full_cache_holds(family, allocation):
    """kv_bytes_ratio = budget: the full cache holds window - 1 tokens in a sliding layer, so half the budget
    there is 7-8 tokens; on Gemma 3 what its sliding layer cannot hold goes to its full layer."""
    from adaflex.retrofit.evaluate import cost_figures

    model, tok = _model(family)
    _kv(model, budget=0.5, allocation=allocation, policy="snapkv", kernel=3)
    ids = tok(TEXT, return_tensors="pt").input_ids
    stored, _ = _stored(model, ids)
    held = [WINDOW - 1 if w else ids.shape[1] for w in model.adaflex.kv.windows]
    assert sum(stored) == round(0.5 * sum(held)) and all(s <= h for s, h in zip(stored, held, strict=True)), stored
    if family == "gemma3" and allocation == "uniform":
        assert stored == [15, 23], stored  # 38 tokens: 19 each, the sliding layer's 4 beyond 15 to the full one
    assert cost_figures(model, ids)["kv_bytes_ratio"] == pytest.approx(0.5, abs=0.02)
    uninstall(model)


def test_a_dropped_window_or_softcap_would_show():
    """The test above can fail: the same prompt through full attention (no window) or without Gemma 2's softcap
    gives other logits (by more than 1e-2, against the 1e-5 the tests above hold)."""
    for family, key, value in (("mistral", "sliding_window", None), ("gemma2", "attn_logit_softcapping", None)):
        model, tok = _model(family)
        ref = generated_logits(model, tok, TEXT, new_tokens=1)
        setattr(model.config, key, value)
        if key == "sliding_window":
            for layer in model.model.layers:
                layer.self_attn.config.sliding_window = None
        else:
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = None
        assert (generated_logits(model, tok, TEXT, new_tokens=1) - ref).abs().max() > 1e-2, family


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_left_padded_batch_matches_transformers(family):
    """Padding slots count as sequence positions in transformers' sliding masks; so they do in the kv cache."""
    model, tok = _model(family)
    tok.padding_side = "left"
    batch = tok([TEXT, TEXT[:40]], return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True,
          "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        ref = torch.stack(model.generate(**batch, **kw).logits)
        _kv(model, budget=1.0)
        got = torch.stack(model.generate(**batch, **kw).logits)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    uninstall(model)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_eviction_inside_the_window_runs_and_stays_bounded(family):
    """8 tokens a layer (fewer than the window's 15): sliding layers evict inside their window too."""
    model, tok = _model(family)
    ref = generated_logits(model, tok, TEXT, new_tokens=6)
    _kv(model, budget=None, tokens=8, policy="snapkv", kernel=3)
    got = generated_logits(model, tok, TEXT, new_tokens=6)
    stored, _ = _stored(model, tok(TEXT, return_tensors="pt").input_ids)
    assert stored == [8] * len(stored), stored
    diff = (got - ref).abs().max()
    assert torch.isfinite(got).all() and 1e-4 < diff < ref.abs().max(), float(diff)
    uninstall(model)


def test_sliding_layer_positions_follow_eviction():
    """The cache keeps each slot's sequence position through compaction: after decoding, a sliding layer holds
    exactly the last window - 1 positions."""
    model, tok = _model("gemma3")
    _kv(model, budget=1.0)
    ids = tok(TEXT, return_tensors="pt").input_ids
    cache = model.adaflex.make_cache()
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        for _ in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, cache=cache, use_cache=True)
    seen = ids.shape[1] + 3
    sliding, full = cache.layers
    assert sliding.pos[0, 0].tolist() == list(range(seen - WINDOW + 1, seen))
    assert full.pos[0, 0].tolist() == list(range(seen))
    uninstall(model)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_under_routes_and_kv_nothing_skipped_gives_transformers_logits(family):
    """Issue 26's done-when: a sliding-window model under kv and routes, every block once, nothing evicted."""
    from adaflex.retrofit.routes.runtime import FixedPolicy
    from adaflex.retrofit.routes.runtime import install as routes_install
    from adaflex.retrofit.routes.runtime import uninstall as routes_uninstall

    model, tok = _model(family)
    ref = generated_logits(model, tok, TEXT, new_tokens=6)
    routes_install(model, FixedPolicy(counts=(1,) * model.config.num_hidden_layers))
    try:
        _kv(model, budget=1.0)
        torch.testing.assert_close(generated_logits(model, tok, TEXT, new_tokens=6), ref, rtol=0, atol=1e-5)
    finally:
        uninstall(model)
        routes_uninstall(model)
