"""Compiled Triton kernels against their references on a GPU, bf16 included (the interpreter has no bf16)."""

import pytest
import torch

from adaflex.kernels import (
    add_rmsnorm_torch,
    add_rmsnorm_triton,
    compact_kv_torch,
    compact_kv_triton,
    decode_attention_torch,
    decode_attention_triton,
    gather_rows_torch,
    gather_rows_triton,
    scatter_add_rows_torch,
    scatter_add_rows_triton,
    shard_lora_linear_torch,
    shard_lora_linear_triton,
)
from adaflex.kernels.shard_lora import STRATEGIES

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(0) if torch.cuda.is_available() else None


@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_kv(cuda, gen, dtype):
    k = torch.randn(3, 3, 517, 64, device=cuda, generator=gen).to(dtype)
    v = torch.randn(3, 3, 517, 64, device=cuda, generator=gen).to(dtype)
    idx = torch.rand(3, 3, 517, device=cuda, generator=gen).argsort(-1)[..., :130].sort(-1).values
    for out, ref in zip(compact_kv_triton(k, v, idx), compact_kv_torch(k, v, idx)):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [((9, 3), 64), ((32, 8), 128)])
def test_decode_attention(cuda, gen, close, dtype, heads, head_dim):
    (hq, hkv), B, T = heads, 3, 1029
    q = torch.randn(B, hq, head_dim, device=cuda, generator=gen).to(dtype)
    k = torch.randn(B, hkv, T, head_dim, device=cuda, generator=gen).to(dtype)
    v = torch.randn(B, hkv, T, head_dim, device=cuda, generator=gen).to(dtype)
    lengths = torch.randint(1, T + 1, (B, hkv), device=cuda, generator=gen)
    lengths[0, 0] = T
    close(decode_attention_triton(q, k, v, lengths), decode_attention_torch(q, k, v, lengths))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_shard_lora(cuda, gen, close, dtype, tokens):
    d_in, d_out, r, n_shards = 576, 1536, 8, 4
    x = torch.randn(tokens, d_in, device=cuda, generator=gen).to(dtype)
    w = (torch.randn(d_out, d_in, device=cuda, generator=gen) / d_in**0.5).to(dtype)
    pool_a = (torch.randn(24, d_in // n_shards, device=cuda, generator=gen) / d_in**0.5).to(dtype)
    pool_b = (torch.randn(24, d_out // n_shards, device=cuda, generator=gen) / r).to(dtype)
    idx_a = torch.randint(0, 24, (r, n_shards), device=cuda, generator=gen)
    idx_b = torch.randint(0, 24, (r, n_shards), device=cuda, generator=gen)
    bias = torch.randn(d_out, device=cuda, generator=gen).to(dtype)
    ref = shard_lora_linear_torch(x, w, pool_a, idx_a, pool_b, idx_b, 2.0, bias)
    for strategy in (None, *STRATEGIES):  # None: the timed pick
        out = shard_lora_linear_triton(x, w, pool_a, idx_a, pool_b, idx_b, 2.0, bias, strategy=strategy)
        if dtype == torch.float32:  # the reference's cuBLAS matmul may use TF32
            torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
        else:  # fused strategies round once, the reference three times: half precision's tolerance x2
            atol, rtol = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}[dtype]
            torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m, s=strategy: f"{s}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_routes(cuda, gen, dtype):
    h = torch.randn(6, 77, 576, device=cuda, generator=gen).to(dtype)
    rows = torch.tensor([5, 1, 2], device=cuda)
    sub = gather_rows_triton(h, rows)
    assert torch.equal(sub, gather_rows_torch(h, rows))
    delta = torch.randn(sub.shape, device=cuda, generator=gen).to(dtype)
    assert torch.equal(scatter_add_rows_triton(h.clone(), rows, delta), scatter_add_rows_torch(h.clone(), rows, delta))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 4096])
def test_add_rmsnorm(cuda, gen, close, dtype, hidden):
    x, res = (torch.randn(37, hidden, device=cuda, generator=gen).to(dtype) for _ in range(2))
    w = torch.randn(hidden, device=cuda, generator=gen).to(dtype)
    normed, new_res = add_rmsnorm_triton(x, res, w, 1e-5)
    ref_normed, ref_res = add_rmsnorm_torch(x, res, w, 1e-5)
    assert torch.equal(new_res, ref_res)
    close(normed, ref_normed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mos_linear_cuda(cuda, monkeypatch, dtype):
    # the shards stage's adapted linear takes the fused kernel on the GPU, with the torch path's result
    from adaflex.retrofit.shards.layer import MoSDelta, ShardPool, attach

    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1536).eval().to(cuda, dtype)
    pool = ShardPool(30, 576, 1536, 4)
    pool.reset_parameters()
    torch.nn.init.normal_(pool.pool_b, std=0.05)
    pool.to(cuda)  # fp32 pools, as training keeps them; the kernel reads them in the activation dtype
    attach(lin, MoSDelta(pool, torch.randint(0, 30, (8, 4), device=cuda), torch.randint(0, 30, (8, 4), device=cuda),
                         2.0, 0.0))
    x = torch.randn(4, 33, 576, device=cuda, dtype=dtype)
    with torch.no_grad():
        fused = lin(x)
        monkeypatch.setenv("ADAFLEX_KERNELS", "torch")
        ref = lin(x)
    atol = {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(fused, ref, atol=atol, rtol=atol)
