"""Fused residual add + RMSNorm, the hot path between Llama sub-blocks.

    new_residual = x + residual
    normed = weight * rmsnorm(new_residual)    # statistics in fp32, cast back before the weight, as HF Llama
x, residual: [..., d] of one dtype; weight: [d]. Returns (normed, new_residual), new tensors.
The Triton version reads x and residual once and writes both outputs in one pass.
Used inside Llama-style decoder blocks (retrofit/fused.py) for `residual + attn_out` -> post_attention_layernorm.
"""

from __future__ import annotations

import torch

from ._dispatch import backend, jit, next_pow2, tl


def add_rmsnorm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    new_residual = x + residual
    h = new_residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), new_residual


@jit
def _add_rmsnorm_kernel(x, res, w, out, new_res, D, eps,
                        sx, sr, so, sn,
                        BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one program per row: the whole row sits in registers
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    s = tl.load(x + row * sx + offs, mask=mask, other=0.0) + tl.load(res + row * sr + offs, mask=mask, other=0.0)
    tl.store(new_res + row * sn + offs, s, mask=mask)
    h = s.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    w_row = tl.load(w + offs, mask=mask, other=0.0)
    tl.store(out + row * so + offs, w_row * h.to(s.dtype), mask=mask)


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    assert x.shape == residual.shape and x.dtype == residual.dtype and weight.shape == x.shape[-1:]
    D = x.shape[-1]
    x2, r2 = x.reshape(-1, D), residual.reshape(-1, D)
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        x2, r2 = x2.contiguous(), r2.contiguous()
    weight = weight.contiguous()
    new_res = torch.empty_like(x2)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0]:
        BLOCK_D = next_pow2(D)
        _add_rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, out, new_res, D, eps,
                                            x2.stride(0), r2.stride(0), out.stride(0), new_res.stride(0),
                                            BLOCK_D=BLOCK_D, num_warps=max(1, min(8, BLOCK_D // 256)))
    return out.reshape(x.shape), new_res.reshape(x.shape)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """(weight · rmsnorm(x + residual), x + residual)."""
    if backend(x, residual, weight) == "triton":
        return add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_torch(x, residual, weight, eps)
