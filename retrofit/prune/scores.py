"""Pruning scores (magnitude, Wanda), exact-count masks (unstructured per row or per matrix, N:M), mask
packing for the run directory, and the layout rules of `torch.sparse.to_sparse_semi_structured`."""

from __future__ import annotations

import numpy as np
import torch

from ..arch import is_conv1d, is_experts, linear_weight, routers
from .experts import ExpertSlice, slices


class Transposed:
    """GPT-2's `Conv1D` (weight stored [in, out]) seen by the pruner as the nn.Linear it computes: `weight` is the
    [out, in] transpose, a view of the parameter (masking it masks the module), so scores, per-output-row
    comparisons, masks and the plan's shape read exactly as for nn.Linear. `module` is where the statistics
    hook goes: the Conv1D's inputs are the linear's inputs."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        return linear_weight(self.module)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]


def block_linears(block: torch.nn.Module) -> list[tuple[str, torch.nn.Linear | Transposed | ExpertSlice]]:
    """The prunable matrices of a decoder block by their name inside the block (no hard-coded projection
    names): its nn.Linear modules, except MoE routers, GPT-2's Conv1D as a `Transposed` view, and one
    `ExpertSlice` per expert of each 3-D experts parameter (`mlp.experts.gate_up_proj.3`), in module order."""
    skip = {id(r) for r in routers(block)}
    out: list = []
    for n, m in block.named_modules():
        if isinstance(m, torch.nn.Linear) and id(m) not in skip:
            out.append((n, m))
        elif is_conv1d(m):
            out.append((n, Transposed(m)))
        elif is_experts(m):
            out += slices(n, m)
    return out


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂, with `sq_norm[j]` = Σ over calibration tokens of x_j² (any common scale)."""
    return weight.detach().abs().float() * sq_norm.float().clamp_min(0).sqrt()[None, :]


def score_of(weight: torch.Tensor, kind: str, sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "magnitude":
        return magnitude_score(weight)
    if sq_norm is None:
        raise ValueError("wanda scores need input statistics")
    return wanda_score(weight, sq_norm)


def pruned_count(numel: int, sparsity: float) -> int:
    """Weights zeroed in a matrix of `numel` at `sparsity`: the nearest whole count."""
    return min(numel, max(0, round(sparsity * numel)))


def keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
              row: bool = True, ranks: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep mask that zeroes the lowest scores.

    Unstructured: exactly round(sparsity · numel) weights are zeroed, compared within each output row
    (`row=True`, Wanda; the remainder goes one weight each to the first rows) or over the whole matrix.
    N:M: in every group of M consecutive inputs of a row the N highest scores are kept (`sparsity` is
    then either 0, nothing pruned, or anything > 0, meaning the pattern). `ranks` (from `score_ranks`)
    saves the sort when one matrix is masked at many levels.
    """
    rows, cols = score.shape
    if sparsity <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"{n}:{m} needs the input dimension divisible by {m}, got {cols}")
        groups = score.reshape(rows, cols // m, m)
        top = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(rows, cols)
    if ranks is None:
        ranks = score_ranks(score, row)
    k = pruned_count(score.numel(), sparsity)
    if row:
        base, extra = divmod(k, rows)
        per_row = torch.full((rows, 1), base, dtype=ranks.dtype)
        per_row[:extra] += 1
        return ranks >= per_row
    return ranks >= k


def score_ranks(score: torch.Tensor, row: bool = True) -> torch.Tensor:
    """Rank of every score (0 = lowest; ties by position) within its row, or over the whole matrix."""
    rows, cols = score.shape
    if row:
        order = score.argsort(dim=1, stable=True)
        pos = torch.arange(cols, dtype=torch.int32).expand(rows, cols).contiguous()
        return torch.empty((rows, cols), dtype=torch.int32).scatter_(1, order, pos)
    order = score.reshape(-1).argsort(stable=True)
    ranks = torch.empty(score.numel(), dtype=torch.int64)
    ranks[order] = torch.arange(score.numel())
    return ranks.reshape(rows, cols)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask (little bit order): 1/8 of a byte per weight in the run directory."""
    return torch.from_numpy(np.packbits(keep.reshape(-1).cpu().numpy(), bitorder="little"))


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    numel = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy().astype(np.uint8), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))


# ---- torch.sparse.to_sparse_semi_structured layout rules, checked without a GPU ----

_FALLBACK_MIN = {torch.float32: (32, 32), torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128)}


def _min_shape(dtype: torch.dtype) -> tuple[int, int] | None:
    try:
        from torch.sparse.semi_structured import SparseSemiStructuredTensorCUTLASS as cls

        c = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
        return (c.sparse_min_rows, c.sparse_min_cols) if c is not None else None
    except (ImportError, AttributeError):  # private API moved: the rules as of torch 2.4-2.13
        return _FALLBACK_MIN.get(dtype)


def semi_structured_problems(weight: torch.Tensor, dtype: torch.dtype | None = None) -> list[str]:
    """Why `to_sparse_semi_structured(weight.to(dtype))` would refuse this tensor (device aside): 2-D,
    contiguous, a supported dtype, both dimensions multiples of the dtype's minimum tile, and at most 2
    nonzeros in every group of 4 consecutive inputs. Empty list: it passes."""
    dtype = dtype or weight.dtype
    out = []
    if weight.dim() != 2:
        return [f"{weight.dim()}-D tensor (2-D required)"]
    if not weight.is_contiguous():
        out.append("not contiguous")
    lim = _min_shape(dtype)
    if lim is None:
        out.append(f"dtype {dtype} not supported")
    else:
        r, c = weight.shape
        if r < lim[0] or r % lim[0] or c < lim[1] or c % lim[1]:
            out.append(f"shape {tuple(weight.shape)} not a multiple of {lim} for {dtype}")
    if weight.shape[1] % 4:
        out.append("input dimension not divisible by 4")
    else:
        nz = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        if int(nz.max()) > 2:
            out.append(f"{int((nz > 2).sum())} groups of 4 hold more than 2 nonzeros")
    return out
