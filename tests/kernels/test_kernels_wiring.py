"""The model forward really uses the kernels: decode attention in the kv stage's attention function, the fused
residual add + RMSNorm in Llama blocks (retrofit/fused.py). Tests with `interpret` run under TRITON_INTERPRET=1
(conftest.py) and compare against ADAFLEX_KERNELS=torch on the same tiny model; call counters on the Triton
launchers make them fail if the wiring is removed."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from adaflex.retrofit import fused
from adaflex.retrofit.kv.apply import install as kv_install
from adaflex.retrofit.kv.apply import spec_from
from adaflex.retrofit.kv.attention import build_mask, decode_span
from adaflex.retrofit.kv.config import KVConfig
from adaflex.retrofit.routes.runtime import forced_paths
from tiny import tiny_llama

# the modules (the package's attributes of the same name are the functions)
da_mod = importlib.import_module("adaflex.kernels.decode_attention")
rms_mod = importlib.import_module("adaflex.kernels.rmsnorm")
GEN = {
    "max_new_tokens": 4,
    "do_sample": False,
    "pad_token_id": 258,
    "output_logits": True,
    "return_dict_in_generate": True,
}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _count(monkeypatch, module, name):
    """Wrap module.name (a Triton launcher) to record the arguments of each call."""
    calls, orig = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return orig(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _padded_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (2, 40), generator=gen)
    mask = torch.ones(2, 40, dtype=torch.long)
    ids[1, :9], mask[1, :9] = 258, 0  # row 1: left padding
    return ids, mask


def _generate(model, ids, mask, monkeypatch, kernels: str | None, **kw):
    if kernels is None:
        monkeypatch.delenv("ADAFLEX_KERNELS", raising=False)
    else:
        monkeypatch.setenv("ADAFLEX_KERNELS", kernels)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **GEN, **kw)
    return out.sequences, torch.stack(out.logits, 1)


# ---- decode attention in the kv attention function ----


def test_decode_span_maps_masks_to_runs():
    t, f = True, False
    valid = torch.tensor(
        [
            [[f, f, t, t, t, f], [f, t, t, t, t, t]],  # the query's own key (last) is always seen
            [[t, t, t, t, t, t], [f, f, f, f, f, f]],
        ]
    )
    lengths, starts = decode_span(valid, 2, 2, 6, "cpu")
    assert lengths.tolist() == [[4, 5], [6, 1]] and starts.tolist() == [[2, 1], [0, 5]]
    # the same keys as build_mask's q == 1 row
    pos = torch.arange(6)
    seen = (pos >= starts[..., None]) & (pos < (starts + lengths)[..., None])
    assert torch.equal(build_mask(1, 6, valid, "cpu")[:, :, 0], seen)
    # one [B, 1, K] mask for every head; None: every key
    lengths, starts = decode_span(valid[:, :1], 2, 3, 6, "cpu")
    assert lengths.shape == (2, 3) and lengths[0].tolist() == [4, 4, 4]
    lengths, starts = decode_span(None, 2, 2, 6, "cpu")
    assert (lengths == 6).all() and (starts == 0).all()
    # a hole (right padding, then a new token): not one run, the caller falls back to SDPA
    assert decode_span(torch.tensor([[[t, t, f, f, t]]]), 1, 1, 5, "cpu") is None


def test_decode_attention_drives_budgeted_generate(interpret, monkeypatch):
    # hidden 72: head dim 18 (not a power of two), 4 query heads on 2 KV heads; pyramid: layers keep different
    # numbers of tokens; snapkv scores with the window attention and evicts while decoding
    model = tiny_llama(layers=2, hidden=72)
    kv_install(model, spec_from(KVConfig(budget=0.5, allocation="pyramid", policy="snapkv", sinks=2, window=6), 2))
    ids, mask = _padded_batch()
    calls = _count(monkeypatch, da_mod, "decode_attention_triton")
    ref_tokens, ref_logits = _generate(model, ids, mask, monkeypatch, "torch")
    assert not calls
    cache = model.adaflex.make_cache()
    tokens, logits = _generate(model, ids, mask, monkeypatch, None, cache=cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # every decode step of every layer (not the prefill) went through the kernel
    assert len(calls) == 2 * (GEN["max_new_tokens"] - 1)
    key_lengths = {args[1].shape[2] for args, _ in calls}
    assert len(key_lengths) > 1  # layers of different kept lengths
    lengths = [args[3] for args, _ in calls]
    starts = [kw["starts"] for _, kw in calls]
    assert all(int(s[0].max()) == 0 for s in starts)  # row 0: no padding, every slot
    assert any(int(s[1].min()) > 0 for s in starts)  # row 1: its kept padding is skipped
    assert all(torch.equal(n + s, torch.full_like(n, a[1].shape[2])) for n, s, (a, _) in zip(lengths, starts, calls))
    assert [layer.stored for layer in cache.layers] == [layer.capacity for layer in cache.layers]


def test_decode_attention_without_budget_padding_mask(interpret, monkeypatch):
    # the same attention function with a plain DynamicCache: the key padding comes from the mask
    from transformers import DynamicCache

    model = tiny_llama(layers=2)
    kv_install(model, spec_from(KVConfig(budget=1.0), 2))
    ids, mask = _padded_batch(seed=1)
    calls = _count(monkeypatch, da_mod, "decode_attention_triton")
    ref = _generate(model, ids, mask, monkeypatch, "torch", cache=DynamicCache(config=model.config))
    out = _generate(model, ids, mask, monkeypatch, None, cache=DynamicCache(config=model.config))
    assert len(calls) == 2 * (GEN["max_new_tokens"] - 1)
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    assert all(kw["starts"][1].min() == 9 for _, kw in calls)  # row 1's nine padding keys are skipped


# ---- fused residual add + RMSNorm in the blocks ----


def test_fused_add_rmsnorm_in_blocks(interpret, monkeypatch):
    model = tiny_llama(layers=3)
    ids, mask = _padded_batch(seed=2)
    x = ids[:, :17]
    with torch.no_grad():
        plain = model(x).logits
        plain_gen = _generate(model, ids, mask, monkeypatch, None)
    assert fused.install(model) and fused.installed(model)
    calls = _count(monkeypatch, rms_mod, "add_rmsnorm_triton")
    with torch.no_grad():
        out = model(x).logits
    assert len(calls) == 3  # once per block
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    gen = _generate(model, ids, mask, monkeypatch, None)
    assert len(calls) == 3 + 3 * GEN["max_new_tokens"]  # prefill and every decode step
    assert torch.equal(gen[0], plain_gen[0])
    torch.testing.assert_close(gen[1], plain_gen[1], atol=1e-5, rtol=1e-5)
    # ADAFLEX_KERNELS=torch: the class's own forward, bit for bit
    monkeypatch.setenv("ADAFLEX_KERNELS", "torch")
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain)
    monkeypatch.delenv("ADAFLEX_KERNELS")
    # gradients: the unfused pair, and backward works
    n = len(calls)
    loss = model(x).logits.square().mean()
    loss.backward()
    assert len(calls) == n and model.model.layers[0].post_attention_layernorm.weight.grad is not None
    # routes: blocks on gathered rows (one row skips block 1, the other repeats block 2)
    with forced_paths(model, [(0, 2, 2), (0, 1, 2)]), torch.no_grad():
        routed = model(x).logits
    assert len(calls) == n + 4  # blocks 0 and 2 for all rows, block 1 for row 1, block 2's repeat for row 0
    fused.uninstall(model)
    with forced_paths(model, [(0, 2, 2), (0, 1, 2)]), torch.no_grad():
        torch.testing.assert_close(routed, model(x).logits, atol=1e-5, rtol=1e-5)
    assert len(calls) == n + 4 and not fused.installed(model)


def test_kv_decode_and_fused_blocks_together(interpret, monkeypatch):
    model = tiny_llama(layers=2)
    kv_install(model, spec_from(KVConfig(budget=0.6, policy="streaming", sinks=2, window=6), 2))
    ids, mask = _padded_batch(seed=3)
    ref = _generate(model, ids, mask, monkeypatch, "torch")
    fused.install(model)
    att = _count(monkeypatch, da_mod, "decode_attention_triton")
    norm = _count(monkeypatch, rms_mod, "add_rmsnorm_triton")
    out = _generate(model, ids, mask, monkeypatch, None)
    assert len(att) == 2 * (GEN["max_new_tokens"] - 1) and len(norm) == 2 * GEN["max_new_tokens"]
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)


# ---- installation (plain CPU: no interpreter needed) ----


def test_load_installs_fusion_exact_off_triton(tiny, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model, _ = tiny
    assert fused.installed(model) and fused.install(model) == 4  # every block, once
    blk = model.model.layers[0]
    assert isinstance(blk, LlamaDecoderLayer) and type(blk).__name__ == "FusedLlamaDecoderLayer"
    assert "forward" not in vars(blk)  # a class, not an instance patch: other stages' patches stay theirs
    if rms_mod.backend(torch.zeros(1)) == "triton":
        monkeypatch.setenv("ADAFLEX_KERNELS", "torch")  # this check is about the fallback
    calls = _count(monkeypatch, rms_mod, "add_rmsnorm_triton")
    x = torch.randint(0, 250, (2, 11))
    plain = copy.deepcopy(model)
    fused.uninstall(plain)
    assert not fused.installed(plain) and type(plain.model.layers[0]) is LlamaDecoderLayer
    assert fused.installed(model) and plain.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)
    assert not calls
    # an instance forward (prune's argument recorder) shadows the fused class while it is there, then goes
    seen = []
    blk.forward = lambda h, *a, **k: seen.append(h) or h
    with torch.no_grad():
        skipped = model(x).logits
    assert len(seen) == 1 and not torch.equal(skipped, plain(x).logits)
    del blk.forward
    with torch.no_grad():
        assert torch.equal(model(x).logits, plain(x).logits)
