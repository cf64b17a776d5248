"""Decode attention (one query token) over caches whose kept length varies per (sequence, KV head).

q: [B, Hq, D]; k, v: [B, Hkv, T, D] where only the slots [starts[b, h], starts[b, h] + lengths[b, h]) of
each (b, h) are valid; lengths, starts: [B, Hkv] integers (starts default 0: a prefix; a left-padded row of
a batch keeps its real tokens in a suffix). GQA: query head i reads KV head i // (Hq // Hkv), as Llama's
repeat_kv. Returns [B, Hq, D] in q's dtype; a (b, h) with length 0 gives zeros.

Used by the kv stage's attention function (retrofit/kv/attention.py) for every decode step (one query
token) when the dispatcher picks Triton.

Triton: split-KV ("flash-decoding"). Pass 1 runs one program per (batch, KV head, split of T); it
handles all query heads of the group at once, so each K/V tile is read once for the group, and writes
the unnormalised output, running max and running sum of its split. Pass 2 merges the splits.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import backend, jit, next_pow2, tl, triton

_LOG2E = 1.4426950408889634


def decode_attention_torch(q, k, v, lengths, scale: float | None = None, starts=None):
    B, Hq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, Hkv, Hq // Hkv, D).float()
    s = (qg @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    pos = torch.arange(T, device=k.device)
    lo = 0 if starts is None else starts.to(k.device)[..., None]
    valid = (pos >= lo) & (pos < lo + lengths.to(k.device)[..., None])  # [B, Hkv, T]
    p = torch.softmax(s.masked_fill(~valid[:, :, None], float("-inf")), dim=-1)
    p = torch.where(valid[:, :, None], p, 0.0)  # an empty cache gives NaN rows in softmax: make them zero
    vf = v.float().masked_fill(~valid[..., None], 0.0)  # slots past the length may hold garbage (NaN)
    return (p @ vf).reshape(B, Hq, D).to(q.dtype)


@jit
def _decode_split_kernel(q, k, v, lengths, starts, o_part, m_part, l_part,
                         Hkv, G, T, D, n_splits, split_len, qk_scale,
                         sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, slb, slh, ssb, ssh,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_STARTS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, h = bh // Hkv, bh % Hkv
    length = tl.load(lengths + b * slb + h * slh).to(tl.int32)
    if HAS_STARTS:
        lo = tl.load(starts + b * ssb + h * ssh).to(tl.int32)
    else:
        lo = 0
    # this split's slots [split * split_len, + split_len) clipped to the valid span [lo, lo + length)
    start = tl.maximum(split * split_len, lo)
    end = tl.minimum(tl.minimum(split * split_len + split_len, lo + length), T)  # never past the cache

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g, mask_d = offs_g < G, offs_d < D
    # rows past G are padding (tl.dot needs >= 16 rows): zero queries, never stored
    q_ptrs = q + b * sqb + (h * G + offs_g)[:, None] * sqh + offs_d[None, :] * sqd
    qt = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    k_base = k + b * skb + h * skh + offs_d[None, :] * skd
    v_base = v + b * svb + h * svh + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        kt = tl.load(k_base + offs_n[:, None] * skt, mask=kv_mask, other=0.0)
        vt = tl.load(v_base + offs_n[:, None] * svt, mask=kv_mask, other=0.0)
        # scores in log2 units: exp2 is the native instruction
        s = tl.dot(qt, tl.trans(kt), input_precision="ieee") * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: each tile holds >= 1 valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        m_i = m_new

    # partials laid out [B, Hkv, n_splits, G(, D)]; an empty split stores m = -inf, l = 0, acc = 0
    row = (bh * n_splits + split) * G + offs_g
    tl.store(m_part + row, m_i, mask=mask_g)
    tl.store(l_part + row, l_i, mask=mask_g)
    tl.store(o_part + row[:, None] * D + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])


@jit
def _decode_merge_kernel(o_part, m_part, l_part, out,
                         Hq, G, D, n_splits, sob, soh, sod,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bq = tl.program_id(0).to(tl.int64)  # one program per (batch, query head)
    b, hq = bq // Hq, bq % Hq
    bh, g = b * (Hq // G) + hq // G, hq % G
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s, mask_d = offs_s < n_splits, offs_d < D
    row = (bh * n_splits + offs_s) * G + g
    m = tl.load(m_part + row, mask=mask_s, other=float("-inf"))
    l_s = tl.load(l_part + row, mask=mask_s, other=0.0)
    o = tl.load(o_part + row[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (length 0)
    w = tl.exp2(m - m_max)  # 0 for empty splits
    denom = tl.sum(w * l_s, axis=0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out + b * sob + hq * soh + offs_d * sod, res.to(out.dtype.element_ty), mask=mask_d)


def _num_splits(q, bh: int, n_blocks: int) -> int:
    # enough programs to fill the device about twice; more splits only add merge work
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    return max(1, min(n_blocks, triton.cdiv(2 * sms, bh), 64))


def decode_attention_triton(q, k, v, lengths, scale: float | None = None, num_splits: int | None = None,
                            starts=None):
    B, Hq, D = q.shape
    _, Hkv, T, _ = k.shape
    assert v.shape == k.shape and k.shape[0] == B and k.shape[3] == D and Hq % Hkv == 0
    assert lengths.shape == (B, Hkv), lengths.shape
    assert starts is None or starts.shape == (B, Hkv), starts.shape
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    BLOCK_D = next_pow2(D)
    BLOCK_N = 64 if BLOCK_D <= 128 else 32  # keeps K and V tiles within registers
    BLOCK_G = max(16, next_pow2(G))  # tl.dot's smallest M
    n_blocks = max(1, triton.cdiv(T, BLOCK_N))
    n_splits = num_splits or _num_splits(q, B * Hkv, n_blocks)
    split_len = triton.cdiv(n_blocks, n_splits) * BLOCK_N  # whole blocks per split
    n_splits = max(1, triton.cdiv(T, split_len))

    f32 = {"dtype": torch.float32, "device": q.device}
    o_part = torch.empty(B, Hkv, n_splits, G, D, **f32)
    m_part = torch.empty(B, Hkv, n_splits, G, **f32)
    l_part = torch.empty(B, Hkv, n_splits, G, **f32)
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    q = q.to(k.dtype)  # tl.dot wants one dtype; q is small, the cache is not
    has_starts = starts is not None
    starts = starts if has_starts else lengths  # never read without HAS_STARTS
    _decode_split_kernel[(B * Hkv, n_splits)](
        q, k, v, lengths, starts, o_part, m_part, l_part,
        Hkv, G, T, D, n_splits, split_len, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *lengths.stride(), *starts.stride(),
        BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_STARTS=has_starts, num_warps=4)
    _decode_merge_kernel[(B * Hq,)](
        o_part, m_part, l_part, out, Hq, G, D, n_splits, *out.stride(),
        BLOCK_S=next_pow2(n_splits), BLOCK_D=BLOCK_D, num_warps=1 if BLOCK_D <= 64 else 2)
    return out


def decode_attention(q, k, v, lengths, scale: float | None = None, starts=None):
    """softmax(q·kᵀ·scale)·v over the keys [starts, starts + lengths) of each (batch, KV head) (starts
    default 0: the first lengths[b, h] keys); scale default 1/sqrt(D)."""
    if backend(q, k, v, lengths, *([] if starts is None else [starts])) == "triton":
        return decode_attention_triton(q, k, v, lengths, scale, starts=starts)
    return decode_attention_torch(q, k, v, lengths, scale, starts=starts)
