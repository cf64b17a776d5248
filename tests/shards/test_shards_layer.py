"""The MoS adapter: parameter counts, index vectors, ΔW = B·A·α/r, compact storage, dtypes."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.arch import decoder_layers
from adaflex.retrofit.evaluate import cost_figures
from adaflex.retrofit.shards import indices as ix
from adaflex.retrofit.shards.apply import collect, targets_of
from adaflex.retrofit.shards.config import TARGETS
from adaflex.retrofit.shards.layer import adapted, index_dtype, merge_all, remove_all
from tiny import tiny_llama

from .helpers import adaflex_params, adapt


def _dims(model):
    blk = decoder_layers(model)[0]
    return {t: (m.in_features, m.out_features) for t in TARGETS for n, m in blk.named_modules()
            if n.endswith(t)}


@pytest.mark.parametrize("e,r,n_sh", [(1, 4, 4), (2, 8, 2), (1, 2, 32)])
def test_shards_mos_params_per_type(e, r, n_sh):
    model = tiny_llama()
    _, plan, _ = adapt(model, method="mos", rank=r, equivalent_rank=e, shards_per_vector=n_sh)
    L = len(decoder_layers(model))
    params = adaflex_params(model)
    for t, (d_in, d_out) in _dims(model).items():
        n = sum(p.numel() for k, p in params.items() if f"adaflex_shards.{t}." in k)
        assert n == e * L * (d_in + d_out), t
    total = e * L * sum(d_in + d_out for d_in, d_out in _dims(model).values())
    assert sum(p.numel() for p in params.values()) == total == plan.trainable_params
    probe = torch.randint(0, 200, (1, 16))
    assert cost_figures(model, probe)["trainable_params"] == total  # what reports show


def test_shards_lora_params_and_ratio():
    model = tiny_llama()
    adapt(model, method="lora", rank=8)
    lora = sum(p.numel() for p in adaflex_params(model).values())
    L = len(decoder_layers(model))
    assert lora == 8 * L * sum(a + b for a, b in _dims(model).values())
    remove_all(model)
    assert not adaflex_params(model) and not adapted(model)
    adapt(model, method="mos", rank=8, equivalent_rank=2, shards_per_vector=4)
    assert sum(p.numel() for p in adaflex_params(model).values()) * 4 == lora  # r/e = 4


def test_shards_indices_subset_without_replacement_and_private_blocks():
    L, r, e, n_sh, p = 4, 6, 3, 4, 1
    a, b = ix.draw(L, r, e, n_sh, p, seed=3)
    public = (e - p) * L * n_sh
    assert a.shape == b.shape == (L, r, n_sh)
    for i in range(L):
        for idx in (a[i], b[i]):
            flat = idx.flatten().tolist()
            assert len(set(flat)) == len(flat)  # no shard twice in a layer
            assert all(v < public for v in idx[: r - p].flatten().tolist())
            priv = set(idx[r - p :].flatten().tolist())
            assert priv == set(range(public + i * p * n_sh, public + (i + 1) * p * n_sh))  # the layer's own block
    assert not torch.equal(a, b)  # pair dissociation
    a2, b2 = ix.draw(L, r, e, n_sh, p, dissociate=False, seed=3)
    assert torch.equal(a2, b2)
    g, _ = ix.draw(L, r, e, n_sh, 0, shard=False, seed=1)  # no vector sharding: n_sh consecutive shards
    assert torch.equal(g - g[..., :1], torch.arange(n_sh).expand_as(g)) and (g[..., 0] % n_sh == 0).all()
    assert torch.equal(ix.draw(L, r, e, n_sh, p, seed=3)[0], a)  # fixed by the seed
    w, _ = ix.draw(2, 8, 1, 4, subset=False, seed=0)  # with replacement: allowed beyond the pool
    assert w.max() < 8
    with pytest.raises(ValueError, match="without replacement"):
        ix.draw(2, 8, 1, 4, subset=True)


def test_shards_delta_is_b_a_alpha_over_r_and_forward_adds_it():
    model = tiny_llama()
    _, _, tensors = adapt(model, rank=4, equivalent_rank=1, shards_per_vector=4, alpha=16, private_rank=0)
    q = targets_of(model, ["q_proj"])["q_proj"][2]
    d_in, d_out = q.in_features, q.out_features
    ia, ib = tensors["index.q_proj.a"][2].long(), tensors["index.q_proj.b"][2].long()
    pa, pb = tensors["pool.q_proj.a"], tensors["pool.q_proj.b"]
    A = torch.stack([torch.cat([pa[j] for j in row]) for row in ia])  # row k = concat of its l shards
    B = torch.stack([torch.cat([pb[j] for j in row]) for row in ib], dim=1)  # column k likewise
    assert A.shape == (4, d_in) and B.shape == (d_out, 4)
    want = B @ A * (16 / 4)
    torch.testing.assert_close(q.adaflex_delta.delta_weight(), want, atol=1e-7, rtol=0)
    x = torch.randn(3, d_in)
    torch.testing.assert_close(q(x), x @ (q.weight + want).T, atol=1e-5, rtol=1e-5)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        adapted_logits = model(ids).logits
        merge_all(model)
        assert not adapted(model)
        torch.testing.assert_close(model(ids).logits, adapted_logits, atol=1e-4, rtol=1e-4)


def test_shards_compact_storage_pools_once_small_index_dtype():
    model = tiny_llama()
    _, plan, _ = adapt(model, rank=4, equivalent_rank=1, shards_per_vector=4)
    saved = collect(model, plan)
    assert sorted(k for k in saved if k.startswith("pool.")) == sorted(
        f"pool.{t}.{s}" for t in TARGETS for s in "ab")  # one A and one B pool per type, no per-layer copy
    assert all(saved[f"index.{t}.a"].dtype == torch.uint8 for t in TARGETS)
    assert saved["index.q_proj.a"].shape == (4, 4, 4)
    state = {k for k in model.state_dict() if "adaflex" in k}
    assert len(state) == 2 * len(TARGETS)  # only the pools: indices are not duplicated per layer in weights
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.int16
    assert index_dtype(40000) == torch.int32


def test_shards_bf16_adapters_train():
    model = tiny_llama().to(torch.bfloat16)
    adapt(model, rank=4, equivalent_rank=1, shards_per_vector=4, dtype="bfloat16")
    params = adaflex_params(model)
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    model.train()
    out = model(torch.randint(0, 200, (2, 16))).logits
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in params.values())
