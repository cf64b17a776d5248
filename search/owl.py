"""OWL: outlier-weighted layerwise sparsity.

Blocks whose Wanda scores hold more outliers are pruned less. For block l with scores A_l (all its
linears together):

    LOD_l = share of A_l above M * mean(A_l)                      (M = 5)
    D_l   = (LOD_l - min LOD) / (max LOD - min LOD) * 2 * lam     (normalised to [0, 2 lam])
    d_l   = D_l - mean(D) + (1 - S)                               (density; mean density = 1 - S)
    s_l   = 1 - d_l

The paper's blocks all have the same size, so a plain mean keeps the global sparsity at S. With
unequal sizes we use the size-weighted mean instead, so sum_l n_l s_l / sum_l n_l = S still holds.
When a sparsity falls outside [0, max_sparsity] (large lam, S near 0 or 1) we clip and shift all
blocks by one common offset t, found by bisection, so the weighted mean is S again and the order of
the blocks is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import BudgetInfeasible

__all__ = ["outlier_ratio", "owl_from_scores", "owl_sparsities"]


def outlier_ratio(scores, m: float = 5.0) -> float:
    """LOD of one block: share of its scores above m times their mean.

    `scores` is one array or a sequence of arrays (one per linear of the block); they are pooled,
    as OWL computes one mean over all linears of the block.
    """
    parts = (
        [np.asarray(scores, dtype=np.float64).ravel()]
        if _is_array(scores)
        else [np.asarray(a, dtype=np.float64).ravel() for a in scores]
    )
    count = sum(p.size for p in parts)
    if count == 0:
        raise ValueError("empty score array")
    mean = sum(float(p.sum()) for p in parts) / count
    return sum(int((p > m * mean).sum()) for p in parts) / count


def owl_sparsities(
    lod,
    target: float,
    lam: float = 0.08,
    sizes=None,
    max_sparsity: float = 0.99,
) -> np.ndarray:
    """Per-block sparsities from outlier ratios; their size-weighted mean equals `target`.

    Args:
        lod: [L] outlier ratio of each block (higher -> pruned less).
        target: global sparsity S.
        lam: half-width of the density spread (0.08 in the paper at 70% on LLaMA-7B).
        sizes: optional [L] weight counts; default equal sizes.
        max_sparsity: upper clip (< 1: a block is never emptied by pruning).

    Raises:
        BudgetInfeasible: target above max_sparsity (`.cheapest` = max_sparsity).
    """
    lod = np.asarray(lod, dtype=np.float64)
    if lod.ndim != 1 or lod.size == 0 or not np.all(np.isfinite(lod)):
        raise ValueError("lod must be a non-empty 1-D array of finite values")
    w = np.ones_like(lod) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if w.shape != lod.shape or np.any(w <= 0):
        raise ValueError("sizes must be positive and match lod")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not 0.0 < max_sparsity < 1.0:
        raise ValueError(f"max_sparsity must lie in (0, 1), got {max_sparsity}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity {target} outside [0, 1)")
    if target > max_sparsity:
        raise BudgetInfeasible(
            f"sparsity {target} above max_sparsity {max_sparsity}", cheapest=max_sparsity, requested=target
        )
    w = w / w.sum()

    spread = lod.max() - lod.min()
    if spread == 0:  # all blocks alike: uniform
        return np.full(lod.shape, float(target))
    D = (lod - lod.min()) / spread * 2 * lam
    density = D - (w * D).sum() + (1.0 - target)
    s = 1.0 - density
    if s.min() >= 0 and s.max() <= max_sparsity:
        return s

    # clip and re-centre: find t with sum_l w_l clip(s_l + t, 0, max) = S (monotone in t)
    lo, hi = -s.max(), max_sparsity - s.min()  # mean is 0 at lo and max_sparsity at hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (w * np.clip(s + mid, 0.0, max_sparsity)).sum() < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return np.clip(s + 0.5 * (lo + hi), 0.0, max_sparsity)


def owl_from_scores(
    block_scores: Sequence,
    target: float,
    lam: float = 0.08,
    m: float = 5.0,
    sizes=None,
    max_sparsity: float = 0.99,
) -> np.ndarray:
    """OWL sparsities straight from raw score arrays, one entry per block.

    Each entry is an array or a sequence of arrays (the block's linears). Sizes default to the
    number of scores of each block, which is its weight count when the scores are per weight.
    """
    lod = np.array([outlier_ratio(b, m) for b in block_scores])
    if sizes is None:
        sizes = [
            np.asarray(b).size if _is_array(b) else sum(np.asarray(a).size for a in b) for b in block_scores
        ]
    return owl_sparsities(lod, target, lam=lam, sizes=sizes, max_sparsity=max_sparsity)


def _is_array(x) -> bool:
    """One array (numpy, torch, ...) rather than a list of per-linear arrays."""
    return hasattr(x, "shape") and hasattr(x, "dtype")
