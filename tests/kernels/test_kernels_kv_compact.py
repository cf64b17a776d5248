import pytest
import torch

from adaflex.kernels import compact_kv, compact_kv_torch, compact_kv_triton


def _indices(B, H, T, K, gen):
    # sorted kept positions, different for every (batch, head), as a KV policy produces them
    return torch.stack([torch.randperm(T, generator=gen)[:K].sort().values for _ in range(B * H)]).view(B, H, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,T,D,K", [(2, 3, 50, 64, 37), (1, 2, 9, 48, 9)])
def test_compact_matches_reference_exactly(interpret, dtype, B, H, T, D, K):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, T, D, generator=gen).to(dtype)
    v = torch.randn(B, H, T, D, generator=gen).to(dtype)
    idx = _indices(B, H, T, K, gen)
    k_out, v_out = compact_kv_triton(k, v, idx)
    k_ref, v_ref = compact_kv_torch(k, v, idx)
    assert k_out.shape == (B, H, K, D) and k_out.is_contiguous()
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    # the definition: row j of (b, h) is position idx[b, h, j]
    assert torch.equal(k_ref[1 % B, 1, 3], k[1 % B, 1, idx[1 % B, 1, 3]])


def test_compact_strided_cache_and_int32_indices(interpret):
    # a cache view with spare capacity and heads-last storage: strides are taken as they are
    gen = torch.Generator().manual_seed(1)
    store = torch.randn(2, 40, 3, 64, generator=gen)  # [B, T_cap, H, D]
    k = store.transpose(1, 2)[:, :, :33]
    v = (store * 2).transpose(1, 2)[:, :, :33]
    idx = _indices(2, 3, 33, 20, gen).to(torch.int32)
    out = compact_kv(k, v, idx)  # dispatcher -> triton under the interpreter
    ref = compact_kv_torch(k, v, idx)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
