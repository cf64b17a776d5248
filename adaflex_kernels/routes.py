"""Row gather / scatter-add for batches whose sequences take different layer paths.

A block runs only on the sequences (rows) whose path executes it:
    sub = gather_rows(h, rows)          # [R, T, d] contiguous copy of h[rows]
    delta = block_delta(sub)            # what the block adds to the residual stream
    scatter_add_rows(h, rows, delta)    # h[rows] += delta in place; other rows untouched
h: [B, T, d] (or [B, d]) residual stream, any strides; rows: [R] integer row ids, unique (a repeated
id would race in the Triton version). scatter_add_rows adds in fp32 and rounds once to h's dtype,
like torch's own add.
"""

from __future__ import annotations

import torch

from ._dispatch import backend, jit, next_pow2, tl, triton


def gather_rows_torch(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return h.index_select(0, rows.to(h.device).long())


def scatter_add_rows_torch(h: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return h.index_add_(0, rows.to(h.device).long(), delta.to(h.dtype))


@jit
def _rows_kernel(h, rows, other, T, D,
                 shb, sht, shd, sob, sot, sod,
                 ADD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # one [BLOCK_T, BLOCK_D] tile of row rows[i]. ADD=False: other[i] = h[row]; ADD=True: h[row] += other[i]
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows + i).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    h_ptrs = h + row * shb + offs_t[:, None] * sht + offs_d[None, :] * shd
    o_ptrs = other + i * sob + offs_t[:, None] * sot + offs_d[None, :] * sod
    if ADD:
        out = tl.load(h_ptrs, mask=mask).to(tl.float32) + tl.load(o_ptrs, mask=mask).to(tl.float32)
        tl.store(h_ptrs, out.to(h.dtype.element_ty), mask=mask)
    else:
        tl.store(o_ptrs, tl.load(h_ptrs, mask=mask), mask=mask)


def _launch(h3: torch.Tensor, rows: torch.Tensor, other3: torch.Tensor, add: bool):
    R, T, D = other3.shape
    if other3.numel() == 0:
        return
    BLOCK_D = min(next_pow2(D), 512)
    BLOCK_T = min(next_pow2(T), max(1, 4096 // BLOCK_D))  # ~4K elements per program
    grid = (R, triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    _rows_kernel[grid](h3, rows, other3, T, D, *h3.stride(), *other3.stride(),
                       ADD=add, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)


def _as3d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t  # a view, so in-place writes reach t


def gather_rows_triton(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.empty((rows.shape[0], *h.shape[1:]), dtype=h.dtype, device=h.device)
    _launch(_as3d(h), rows, _as3d(out), add=False)
    return out


def scatter_add_rows_triton(h: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    assert delta.shape == (rows.shape[0], *h.shape[1:]), (h.shape, rows.shape, delta.shape)
    _launch(_as3d(h), rows, _as3d(delta), add=True)
    return h


def gather_rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h[rows] as a new contiguous tensor [R, *h.shape[1:]]."""
    if backend(h, rows) == "triton":
        return gather_rows_triton(h, rows)
    return gather_rows_torch(h, rows)


def scatter_add_rows(h: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """h[rows] += delta in place (rows unique); rows not listed are left as they are. Returns h."""
    if backend(h, rows, delta) == "triton":
        return scatter_add_rows_triton(h, rows, delta)
    return scatter_add_rows_torch(h, rows, delta)
