"""Per-layer KV-cache budgets: how many tokens each layer keeps, summing to a global total.

All allocators return integer token counts (np.int64) that sum exactly to `total`, respect each
layer's length (it cannot keep more tokens than it has) and any per-layer floor.

    uniform   the same count everywhere (kvpress's SnapKV / StreamingLLM baselines)
    pyramid   PyramidKV: budgets fall linearly with depth
    cake      CAKE: B_l proportional to a layer preference P_l = H_l^(1/tau1) * V_l^(1/tau2), capped
              at the layer's length, the excess spread over the uncapped layers
    prefixkv  PrefixKV: one shared attention-mass threshold p; layer l keeps the smallest top-k whose
              cumulative mass reaches p; p found by bisection, then counts rescaled to the total
    promote   plans that give the few layers whose eviction hurts most (measured gains, e.g. the layers
              that copy from far back) most of their tokens, the others sharing what is left evenly

Real-valued shares come from one water-filling step (`water_fill`): find the scale s with
sum_l clip(w_l * s, lo_l, hi_l) = total; this is exactly "cap, then spread the excess over the
uncapped layers, repeat". Integers come from largest-remainder rounding (`round_to_total`): floor
every share, then hand the missing tokens to the largest fractional parts. Every count is the floor
or the ceiling of its real share. Largest remainder can show the Alabama paradox: raising the total
by one token can take one token from a layer (never more than one); the real shares themselves are
monotone in the total.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import BudgetInfeasible

__all__ = [
    "average_plans",
    "cake",
    "cake_preference",
    "cumulative_mass",
    "plan_counts",
    "prefixkv",
    "promote",
    "promotion_plans",
    "pyramid",
    "round_to_total",
    "uniform",
]


def round_to_total(x, total: int, hi=None) -> np.ndarray:
    """Largest-remainder rounding of non-negative shares `x` to integers summing to `total`.

    `hi` (optional, integer caps) is respected: a layer at its cap gets no extra token. Ties between
    equal remainders go to the lower layer index, so the result is deterministic.
    """
    x = np.asarray(x, dtype=np.float64)
    hi = np.full(x.shape, int(total)) if hi is None else np.asarray(hi, dtype=np.int64)
    base = np.minimum(np.floor(x + 1e-9).astype(np.int64), hi)  # 1e-9: 2.9999999 is 3
    missing = int(total) - int(base.sum())
    if missing < 0 or missing > int((hi - base).sum()):
        raise ValueError(f"cannot round shares summing to {x.sum():.6g} to {total} within the caps")
    frac = x - base
    order = np.argsort(-frac, kind="stable")  # largest remainder first, lower index on ties
    while missing > 0:  # one pass suffices unless float noise hid a remainder; loop to be safe
        for i in order:
            if missing == 0:
                break
            if base[i] < hi[i]:
                base[i] += 1
                missing -= 1
    return base


def water_fill(w, total: float, lo, hi) -> np.ndarray:
    """Real shares clip(w * s, lo, hi) with the scale s chosen so they sum to `total`.

    Layers with zero weight stay at their floor unless the weighted layers are all full, in which
    case the rest is spread evenly over them. Solved exactly: the sum is piecewise linear in s.
    """
    w, lo, hi = (np.asarray(a, dtype=np.float64) for a in (w, lo, hi))
    if total < lo.sum() - 1e-9 or total > hi.sum() + 1e-9:
        raise ValueError(f"total {total} outside [{lo.sum()}, {hi.sum()}]")
    pos = w > 0
    if not pos.any():
        return water_fill(np.ones_like(w), total, lo, hi)
    full = np.where(pos, hi, lo)
    if total > full.sum():  # weighted layers saturate; zero-weight layers take the rest evenly
        rest = water_fill(np.ones(int((~pos).sum())), total - hi[pos].sum(), lo[~pos], hi[~pos])
        full[~pos] = rest
        return full

    def f(s):  # total kept at scale s (s may be a vector of scales)
        s = np.atleast_1d(s)
        return np.where(pos[None], np.clip(w[None] * s[:, None], lo[None], hi[None]), lo[None]).sum(axis=1)

    # f is linear between consecutive breakpoints lo/w, hi/w: find the segment holding `total`
    ws = w[pos]
    knots = np.unique(np.concatenate([[0.0], lo[pos] / ws, hi[pos] / ws]))
    vals = f(knots)
    j = int(np.searchsorted(vals, total - 1e-12))
    if j == 0:
        s = knots[0]
    else:
        s0, s1, f0, f1 = knots[j - 1], knots[j], vals[j - 1], vals[j]
        s = s1 if f1 == f0 else s0 + (total - f0) * (s1 - s0) / (f1 - f0)
    return np.where(pos, np.clip(w * s, lo, hi), lo)


def _bounds(n_layers: int, total: int, lengths, min_keep) -> tuple[np.ndarray, np.ndarray]:
    """Integer floor/cap per layer, with the feasibility checks every allocator shares."""
    if total < 0 or int(total) != total:
        raise ValueError(f"total must be a non-negative integer, got {total}")
    if lengths is None:
        hi = np.full(n_layers, int(total), dtype=np.int64)
    else:
        hi = np.broadcast_to(np.asarray(lengths, dtype=np.int64), (n_layers,)).copy()
        if np.any(hi < 0):
            raise ValueError("lengths must be >= 0")
    lo = np.minimum(np.broadcast_to(np.asarray(min_keep, dtype=np.int64), (n_layers,)), hi)
    if total > hi.sum():
        raise ValueError(f"total {total} exceeds the {int(hi.sum())} tokens the layers hold")
    if total < lo.sum():
        raise BudgetInfeasible(
            f"total {total} below the per-layer floors ({int(lo.sum())})",
            cheapest=int(lo.sum()),
            requested=total,
        )
    return lo, hi


def _allocate(weights, total: int, lengths, min_keep) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("need a non-empty 1-D array of layer weights")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("layer weights must be finite and >= 0")
    lo, hi = _bounds(w.size, total, lengths, min_keep)
    return round_to_total(water_fill(w, total, lo, hi), total, hi)


def uniform(n_layers: int, total: int, lengths=None, min_keep=0) -> np.ndarray:
    """The same budget for every layer (the first layers take the remainder)."""
    return _allocate(np.ones(n_layers), total, lengths, min_keep)


def pyramid(n_layers: int, total: int, beta: float = 20.0, lengths=None, min_keep=0) -> np.ndarray:
    """PyramidKV: budgets fall linearly with depth, first layer largest.

    With mean m = total / L the last layer gets m / beta and the first 2m - m / beta (PyramidKV's
    arithmetic schedule); beta = 1 is uniform. Caps and floors are then applied by water-filling.
    """
    if beta < 1:
        raise ValueError(f"beta must be >= 1, got {beta}")
    m = total / n_layers
    bottom, top = 2 * m - m / beta, m / beta
    w = np.linspace(bottom, top, n_layers) if n_layers > 1 else np.array([m])
    return _allocate(w, total, lengths, min_keep)


def cake_preference(entropy, variance, tau1: float = 1.0, tau2: float = 1.0) -> np.ndarray:
    """CAKE layer preference P_l = H_l^(1/tau1) * V_l^(1/tau2) (spread and shift of attention)."""
    H = np.asarray(entropy, dtype=np.float64)
    V = np.asarray(variance, dtype=np.float64)
    if np.any(H < 0) or np.any(V < 0):
        raise ValueError("entropy and variance must be >= 0")
    if tau1 <= 0 or tau2 <= 0:
        raise ValueError("temperatures must be > 0")
    return H ** (1.0 / tau1) * V ** (1.0 / tau2)


def cake(preferences, total: int, lengths=None, min_keep=0) -> np.ndarray:
    """CAKE: B_l proportional to P_l, capped at the layer's length, excess to the uncapped layers.

    All-zero preferences give the uniform split.
    """
    return _allocate(preferences, total, lengths, min_keep)


def cumulative_mass(importance) -> np.ndarray:
    """c(k) for k = 1..N: share of a layer's attention mass held by its top-k keys."""
    a = np.sort(np.asarray(importance, dtype=np.float64).ravel())[::-1]
    if a.size == 0 or np.any(a < 0):
        raise ValueError("importance must be non-empty and >= 0")
    s = a.sum()
    return np.cumsum(a) / s if s > 0 else np.arange(1, a.size + 1) / a.size


def prefixkv(
    cum_curves: Sequence,
    total: int,
    tol: int = 5,
    min_keep=0,
    max_iter: int = 100,
) -> np.ndarray:
    """PrefixKV: one shared mass threshold p, each layer keeps the smallest k with c_l(k) >= p.

    Args:
        cum_curves: per layer, c_l(1..N_l) (see `cumulative_mass`); layers may differ in length N_l.
        total: global number of tokens to keep.
        tol: bisection stops once the kept total is within tol tokens of `total`.
        min_keep: per-layer floor (scalar or [L]); the plain method starves some layers, a floor
            fixes most of that (see methods.md).

    After the bisection the counts are rescaled proportionally (within floors and lengths) so they
    sum to `total` exactly.
    """
    curves = [np.asarray(c, dtype=np.float64).ravel() for c in cum_curves]
    if not curves or any(c.size == 0 for c in curves):
        raise ValueError("need one non-empty cumulative curve per layer")
    for c in curves:
        if np.any(np.diff(c) < -1e-9) or c[0] < -1e-9 or c[-1] > 1 + 1e-6:
            raise ValueError("cumulative curves must be non-decreasing shares in [0, 1]")
    lengths = np.array([c.size for c in curves], dtype=np.int64)
    lo, hi = _bounds(len(curves), total, lengths, min_keep)

    def kept(p: float) -> np.ndarray:
        # smallest k with c(k) >= p; a curve ending just below 1 by float noise keeps everything
        k = np.array([np.searchsorted(c, p - 1e-12, side="left") + 1 for c in curves])
        return np.clip(k, lo, hi)

    a, b = 0.0, 1.0  # kept(p) is non-decreasing in p
    best = kept(b)
    for _ in range(max_iter):
        p = 0.5 * (a + b)
        k = kept(p)
        if abs(int(k.sum()) - total) < abs(int(best.sum()) - total):
            best = k
        if abs(int(k.sum()) - total) <= tol:
            best = k
            break
        if k.sum() < total:
            a = p
        else:
            b = p
    k0 = kept(0.0)
    if abs(int(k0.sum()) - total) < abs(int(best.sum()) - total):
        best = k0
    return round_to_total(water_fill(best, total, lo, hi), total, hi)


def average_plans(plans: Sequence, weights=None) -> np.ndarray:
    """Offline plan: per-layer retained fractions averaged over calibration samples."""
    arr = np.asarray([np.asarray(p, dtype=np.float64) for p in plans])
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError("plans must be a non-empty list of equal-length 1-D fraction arrays")
    if np.any(arr < 0) or np.any(arr > 1):
        raise ValueError("fractions must lie in [0, 1]")
    return np.average(arr, axis=0, weights=weights)


def plan_counts(fractions, length: int, total: int | None = None, min_keep=0, lengths=None) -> np.ndarray:
    """Token counts of a static per-layer plan for a prompt of `length` tokens.

    `total` defaults to round(sum(fractions) * length); counts keep the plan's proportions. `lengths`: per-layer
    caps (a sliding layer holds at most its window - 1), `length` each by default.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if total is None:
        total = round(float(f.sum()) * length)
    return _allocate(f, total, np.full(f.size, length) if lengths is None else lengths, min_keep)


def promote(gains, mean: float, floor: float, tiers) -> np.ndarray | None:
    """Fractions where the layers ranked by gain (largest first) keep the levels of `tiers`, a list of (count,
    level): the first `count` layers keep `level` of their tokens, the next ones the next tier's level; the
    others share what is left evenly, so the mean stays `mean`. None when those others would fall below `floor`
    or keep as much as a promoted layer."""
    g = np.asarray(gains, dtype=np.float64)
    n, promoted = g.size, sum(c for c, _ in tiers)
    if any(c < 1 for c, _ in tiers) or not 0 < promoted < n:
        raise ValueError(f"tiers {tiers}: counts must be >= 1 and promote fewer than the {n} layers")
    levels = np.concatenate([np.full(c, lv, dtype=np.float64) for c, lv in tiers])
    rest = (n * mean - levels.sum()) / (n - promoted)
    if rest < floor - 1e-12 or rest >= levels.min():
        return None
    f = np.full(n, rest)
    f[np.argsort(-g, kind="stable")[:promoted]] = levels
    return f


def promotion_plans(gains, mean: float, floor: float, most: int = 6, pairs: int = 4,
                    sizes=None) -> dict[str, np.ndarray]:
    """Every feasible `promote` plan over the layers of positive gain: up to `most` of them (or each count of
    `sizes`) at full or half cache, and up to `pairs` at full followed by up to `pairs` at half."""
    positive = min(int((np.asarray(gains) > 0).sum()), len(gains) - 1)  # at least one layer pays
    sizes = range(1, most + 1) if sizes is None else sizes
    shapes = [[(c, lv)] for lv in (1.0, 0.5) for c in sizes if 1 <= c <= positive]
    shapes += [[(a, 1.0), (b, 0.5)] for a in range(1, pairs + 1) for b in range(1, pairs + 1) if a + b <= positive]
    plans = {}
    for tiers in shapes:
        f = promote(gains, mean, floor, tiers)
        if f is not None:
            plans["+".join(f"top{c}@{lv:g}" for c, lv in tiers)] = f
    return plans
