"""Shard-LoRA (Mixture of Shards) linear: y = x·Wᵀ + bias + ((x·Aᵀ)·Bᵀ)·scale.

A (r × d_in) and B (d_out × r) are assembled from shared pools by index, l shards per rank vector:
    pool_a [n_a, d_in / l], idx_a [r, l]: row k of A = concat_j pool_a[idx_a[k, j]]
    pool_b [n_b, d_out / l], idx_b [r, l]: column k of B = concat_j pool_b[idx_b[k, j]]
x: [..., d_in], weight: [d_out, d_in], bias: [d_out] or None. Pools are used in x's dtype.

Triton: x·Wᵀ + bias stays a torch matmul (cuBLAS); the low-rank part runs in two kernels that read
pool entries in place, so A and B never exist in memory. "down" computes u = x·Aᵀ split over d_in
(fp32 partial sums, no atomics, deterministic); "up" sums the partials, computes u·Bᵀ·scale and adds
it into y in place, so the low-rank term costs one extra read and write of y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import backend, jit, next_pow2, tl, triton


def shard_lora_linear_torch(x, weight, pool_a, idx_a, pool_b, idx_b, scale: float, bias=None):
    r = idx_a.shape[0]
    d_out, d_in = weight.shape
    a = pool_a[idx_a.long()].reshape(r, d_in).to(x.dtype)  # [r, d_in]
    bt = pool_b[idx_b.long()].reshape(r, d_out).to(x.dtype)  # Bᵀ: row k is column k of B
    return F.linear(x, weight, bias) + (x @ a.T) @ bt * scale


@jit
def _shard_down_kernel(x, pool_a, idx_a, u_part,
                       N, d_in, r, shard, chunk,
                       sxn, sxd, spa, spc, sir, sij,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # u_part[split] = x[:, chunk of d_in] · A[:, same chunk]ᵀ, A gathered element-wise from the pool
    pid_m, split = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_r = offs_m < N, offs_r < r
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    i_start = split * chunk
    for i0 in range(i_start, tl.minimum(i_start + chunk, d_in), BLOCK_K):
        offs_i = i0 + tl.arange(0, BLOCK_K)
        mask_i = offs_i < d_in
        xt = tl.load(x + offs_m[:, None].to(tl.int64) * sxn + offs_i[None, :] * sxd,
                     mask=mask_m[:, None] & mask_i[None, :], other=0.0)
        # Aᵀ tile [BLOCK_K, BLOCK_R]: Aᵀ[i, k] = pool_a[idx_a[k, i // shard], i % shard]
        m_ir = mask_i[:, None] & mask_r[None, :]
        rows = tl.load(idx_a + offs_r[None, :] * sir + (offs_i // shard)[:, None] * sij, mask=m_ir, other=0)
        at = tl.load(pool_a + rows.to(tl.int64) * spa + (offs_i % shard)[:, None] * spc, mask=m_ir, other=0.0)
        acc += tl.dot(xt, at.to(xt.dtype), input_precision="ieee")
    dst = u_part + (split * N + offs_m)[:, None].to(tl.int64) * BLOCK_R + offs_r[None, :]
    tl.store(dst, acc, mask=mask_m[:, None])


@jit
def _shard_up_kernel(u_part, pool_b, idx_b, y,
                     N, d_out, r, shard, n_splits, scale,
                     spb, spc, sir, sij, syn, syo,
                     BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    # y[m-tile, o-tile] += (Σ_splits u_part) · Bᵀ[:, o-tile] · scale
    pid_m, pid_o = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m, mask_o, mask_r = offs_m < N, offs_o < d_out, offs_r < r
    u = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for s in range(n_splits):  # padded rank columns were stored as zeros
        src = u_part + (s * N + offs_m)[:, None].to(tl.int64) * BLOCK_R + offs_r[None, :]
        u += tl.load(src, mask=mask_m[:, None], other=0.0)
    # Bᵀ tile [BLOCK_R, BLOCK_O]: Bᵀ[k, o] = pool_b[idx_b[k, o // shard], o % shard]
    m_ro = mask_r[:, None] & mask_o[None, :]
    rows = tl.load(idx_b + offs_r[:, None] * sir + (offs_o // shard)[None, :] * sij, mask=m_ro, other=0)
    bt = tl.load(pool_b + rows.to(tl.int64) * spb + (offs_o % shard)[None, :] * spc, mask=m_ro, other=0.0)
    y_ptrs = y + offs_m[:, None].to(tl.int64) * syn + offs_o[None, :] * syo
    mask = mask_m[:, None] & mask_o[None, :]
    # u is rounded to the activation dtype (the pools' dtype here), as the reference's (x·Aᵀ) is
    delta = tl.dot(u.to(bt.dtype), bt, input_precision="ieee") * scale
    y_old = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + delta).to(y.dtype.element_ty), mask=mask)


def shard_lora_linear_triton(x, weight, pool_a, idx_a, pool_b, idx_b, scale: float, bias=None):
    d_out, d_in = weight.shape
    r, n_shards = idx_a.shape
    assert idx_b.shape == (r, n_shards), (idx_a.shape, idx_b.shape)
    assert pool_a.shape[1] * n_shards == d_in and pool_b.shape[1] * n_shards == d_out, "pools do not fit W"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    N = x2.shape[0]
    pool_a, pool_b = pool_a.to(x.dtype), pool_b.to(x.dtype)
    y = F.linear(x2, weight, bias).contiguous()  # cuBLAS; the low-rank term is added into it in place
    if N == 0 or r == 0:
        return y.reshape(*lead, d_out)

    BLOCK_M = min(64, max(16, next_pow2(N)))  # tl.dot needs >= 16 on each side
    BLOCK_R = max(16, next_pow2(r))
    BLOCK_K, BLOCK_O = 64, 128
    m_blocks, k_blocks = triton.cdiv(N, BLOCK_M), triton.cdiv(d_in, BLOCK_K)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    # split d_in while there are few token blocks (decode, short prompts) to fill the device; every
    # "up" program re-reads all the partials, so keep them few
    n_splits = max(1, min(16, k_blocks, triton.cdiv(sms, m_blocks)))
    chunk = triton.cdiv(k_blocks, n_splits) * BLOCK_K
    n_splits = triton.cdiv(d_in, chunk)  # no empty split: every row of u_part gets written

    u_part = torch.empty(n_splits, N, BLOCK_R, dtype=torch.float32, device=x.device)
    _shard_down_kernel[(m_blocks, n_splits)](
        x2, pool_a, idx_a, u_part, N, d_in, r, d_in // n_shards, chunk,
        *x2.stride(), *pool_a.stride(), *idx_a.stride(),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R)
    _shard_up_kernel[(m_blocks, triton.cdiv(d_out, BLOCK_O))](
        u_part, pool_b, idx_b, y, N, d_out, r, d_out // n_shards, n_splits, float(scale),
        *pool_b.stride(), *idx_b.stride(), *y.stride(),
        BLOCK_M=BLOCK_M, BLOCK_O=BLOCK_O, BLOCK_R=BLOCK_R)
    return y.reshape(*lead, d_out)


def shard_lora_linear(x, weight, pool_a, idx_a, pool_b, idx_b, scale: float, bias=None):
    """x·Wᵀ + bias + ((x·Aᵀ)·Bᵀ)·scale with A, B read shard by shard from pool_a / pool_b."""
    tensors = [x, weight, pool_a, idx_a, pool_b, idx_b] + ([] if bias is None else [bias])
    if backend(*tensors) == "triton":
        return shard_lora_linear_triton(x, weight, pool_a, idx_a, pool_b, idx_b, scale, bias)
    return shard_lora_linear_torch(x, weight, pool_a, idx_a, pool_b, idx_b, scale, bias)
