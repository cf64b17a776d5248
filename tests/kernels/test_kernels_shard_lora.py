import pytest
import torch
import torch.nn.functional as F

from adaflex.kernels import shard_lora_linear, shard_lora_linear_torch, shard_lora_linear_triton
from adaflex.kernels.shard_lora import STRATEGIES


def _problem(dtype, d_in=96, d_out=72, r=6, n_shards=4, n_a=10, n_b=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dtype)
    pool_a = (torch.randn(n_a, d_in // n_shards, generator=gen) / d_in**0.5).to(dtype)
    pool_b = torch.randn(n_b, d_out // n_shards, generator=gen).to(dtype)
    idx_a = torch.randint(0, n_a, (r, n_shards), generator=gen)
    idx_b = torch.randint(0, n_b, (r, n_shards), generator=gen)
    bias = torch.randn(d_out, generator=gen).to(dtype)
    return w, pool_a, idx_a, pool_b, idx_b, bias


def _assembled(pool_a, idx_a, pool_b, idx_b, d_in, d_out):
    # A and B written out from the definition, loop by loop
    r, n_shards = idx_a.shape
    sa, sb = d_in // n_shards, d_out // n_shards
    a = torch.zeros(r, d_in, dtype=pool_a.dtype)
    b = torch.zeros(d_out, r, dtype=pool_b.dtype)
    for k in range(r):
        for j in range(n_shards):
            a[k, j * sa:(j + 1) * sa] = pool_a[idx_a[k, j]]
            b[j * sb:(j + 1) * sb, k] = pool_b[idx_b[k, j]]
    return a, b


def test_reference_is_lora_with_assembled_factors():
    w, pool_a, idx_a, pool_b, idx_b, bias = _problem(torch.float64)
    x = torch.randn(5, 96, dtype=torch.float64)
    a, b = _assembled(pool_a, idx_a, pool_b, idx_b, 96, 72)
    expect = F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * 0.75
    torch.testing.assert_close(shard_lora_linear_torch(x, w, pool_a, idx_a, pool_b, idx_b, 0.75, bias), expect)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,with_bias", [((37,), True), ((2, 9), False)])
def test_triton_matches_reference(interpret, close, strategy, dtype, lead, with_bias):
    w, pool_a, idx_a, pool_b, idx_b, bias = _problem(dtype)
    x = torch.randn(*lead, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = bias if with_bias else None
    out = shard_lora_linear_triton(x, w, pool_a, idx_a, pool_b, idx_b, 2.0, bias, strategy=strategy)
    ref = shard_lora_linear_torch(x, w, pool_a, idx_a, pool_b, idx_b, 2.0, bias)
    assert out.shape == (*lead, 72) and out.dtype == dtype
    close(out, ref)


def test_rank_16_one_shard_via_dispatcher(interpret, close):
    # l = 1 is plain LoRA with rows picked from a bank (VB-LoRA-like); r = 16 fills the tile exactly
    w, pool_a, idx_a, pool_b, idx_b, bias = _problem(torch.float32, d_in=64, d_out=80, r=16, n_shards=1,
                                                     n_a=20, n_b=18, seed=2)
    x = torch.randn(3, 64)
    close(shard_lora_linear(x, w, pool_a, idx_a, pool_b, idx_b, 0.5, bias),
          shard_lora_linear_torch(x, w, pool_a, idx_a, pool_b, idx_b, 0.5, bias))


def test_mos_linear_runs_the_fused_kernel(interpret, close, monkeypatch):
    # a MoS-adapted nn.Linear in inference takes the Triton kernel, with the result of the torch path
    from adaflex.kernels import shard_lora as mod
    from adaflex.retrofit.shards.layer import MoSDelta, ShardPool, attach, detach

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 72).eval()
    pool = ShardPool(10, 96, 72, 4)
    pool.reset_parameters()
    torch.nn.init.normal_(pool.pool_b)  # B = 0 at init would hide the low-rank term
    attach(lin, MoSDelta(pool, torch.randint(0, 10, (6, 4)), torch.randint(0, 10, (6, 4)), 0.5, 0.0))
    x = torch.randn(2, 5, 96)
    calls = []
    real = mod.shard_lora_linear_triton
    monkeypatch.setattr(mod, "shard_lora_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        fused = lin(x)
        monkeypatch.setenv("ADAFLEX_KERNELS", "torch")
        ref = lin(x)
        detach(lin)
        base = lin(x)
    assert calls == [1]
    close(fused, ref)
    assert not torch.allclose(ref, base)  # the adapter contributes
