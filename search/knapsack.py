"""Layer-adaptive pruning ratios by dynamic programming (RD pruning, ICCV 2023).

Every prunable unit u (a block, or one linear) has a measured distortion curve D_u(s) at K sparsity
levels and a size n_u (its weight count). Assuming distortions add up,

    minimise   sum_u D_u(s_u)
    subject to sum_u n_u * (1 - s_u) <= (1 - S) * sum_u n_u        (achieved sparsity >= S)

is a multiple-choice knapsack: one level per unit, kept weights as the cost. We discretise the cost
in steps of q = granularity * total weights and run the classic DP over the budget, O(U * B * K)
with B = (1 - S) / granularity cells (vectorised over B with numpy).

Rounding (why the constraint always holds exactly): each unit's cost is measured relative to a
reference level and the difference is rounded *up* to whole steps (a saving, i.e. a negative
difference, is thus never overstated), while the spare budget of the reference is rounded *down*.
So any configuration the DP accepts is feasible in exact weight counts (up to a relative 1e-12 of
float slack, so that uniform pruning at exactly S counts as feasible). The reference is the
uniform configuration (each unit at its least sparse allowed level >= S) when that is feasible, so
the DP never does worse than uniform pruning; otherwise it is the sparsest allowed configuration, so
"infeasible" is decided exactly. The price is a little unused budget: under one step per unit, i.e.
the achieved sparsity may exceed S by up to U * granularity. A greedy pass then spends the exact
leftover on the best distortion decreases, which only improves the result.
The exact achieved sparsity is returned with the allocation.

Additivity can fail on LLMs (EvoPress): `additivity_report` compares predicted and measured
distortions of a few configurations so every search can report it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BudgetInfeasible

__all__ = ["AdditivityReport", "Allocation", "additivity_report", "allocate", "spearman"]

_EPS = 1e-9  # slack for float noise when counting whole budget steps


@dataclass(frozen=True)
class Allocation:
    """The chosen level of every unit.

    `level_index[u]` indexes `levels`; the value `len(levels)` means "dropped whole" (the optional
    drop level). `distortion` is the predicted sum of D_u, `kept`/`total` are exact weight counts.
    """

    level_index: np.ndarray  # [U] int
    sparsity: np.ndarray  # [U] float, 1.0 for dropped units
    dropped: np.ndarray  # [U] bool
    distortion: float
    kept: float
    total: float
    target: float
    granularity: float

    @property
    def achieved_sparsity(self) -> float:
        """Exact size-weighted sparsity of the allocation (>= target up to float rounding)."""
        return 1.0 - self.kept / self.total


def allocate(
    curves,
    levels,
    sizes,
    target: float,
    *,
    granularity: float = 1e-4,
    max_sparsity=None,
    drop_distortion=None,
) -> Allocation:
    """Choose one sparsity level per unit minimising the summed distortion under a sparsity target.

    Args:
        curves: [U, K] distortion of unit u pruned alone at `levels[k]`. NaN or +inf marks a level
            that was not measured / is not allowed for that unit.
        levels: [K] sparsity levels in [0, 1] (any order).
        sizes: [U] weight count n_u of each unit (> 0).
        target: global sparsity S in [0, 1]; the result keeps at most (1 - S) * sum(sizes) weights.
        granularity: budget step as a fraction of all weights (1e-4 = 0.01%). Smaller is more exact
            (overshoot <= U * granularity) and costs proportionally more time and memory.
        max_sparsity: scalar or [U]; pruning levels above it are not allowed for that unit.
        drop_distortion: optional [U] distortion of removing unit u entirely (sparsity 1.0), so depth
            and width compete; NaN/inf where a unit must not be dropped. `max_sparsity` does not
            apply to this explicit drop level.

    Raises:
        BudgetInfeasible: even the sparsest allowed configuration keeps too many weights;
            `.cheapest` is the highest reachable sparsity.
    """
    D = np.asarray(curves, dtype=np.float64)
    s = np.asarray(levels, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    if D.ndim != 2 or s.shape != (D.shape[1],) or n.shape != (D.shape[0],):
        raise ValueError(f"shapes disagree: curves {D.shape}, levels {s.shape}, sizes {n.shape}")
    if D.shape[0] == 0 or D.shape[1] == 0:
        raise ValueError("need at least one unit and one level")
    if np.any((s < 0) | (s > 1)) or not np.all(np.isfinite(s)):
        raise ValueError("levels must lie in [0, 1]")
    if np.any(n <= 0) or not np.all(np.isfinite(n)):
        raise ValueError("sizes must be positive")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target sparsity {target} outside [0, 1]")
    if not 0.0 < granularity <= 1.0:
        raise ValueError(f"granularity {granularity} outside (0, 1]")
    U, K = D.shape

    # allowed[u, k]: level measured and within the unit's cap
    allowed = np.isfinite(D)
    if max_sparsity is not None:
        cap = np.broadcast_to(np.asarray(max_sparsity, dtype=np.float64), (U,))
        allowed &= s[None, :] <= cap[:, None] + 1e-12
    S = np.broadcast_to(s, (U, K))
    if drop_distortion is not None:
        dd = np.asarray(drop_distortion, dtype=np.float64)
        if dd.shape != (U,):
            raise ValueError(f"drop_distortion must have shape ({U},), got {dd.shape}")
        D = np.concatenate([D, dd[:, None]], axis=1)
        S = np.concatenate([S, np.ones((U, 1))], axis=1)
        allowed = np.concatenate([allowed, np.isfinite(dd)[:, None]], axis=1)
    if not np.all(allowed.any(axis=1)):
        bad = np.flatnonzero(~allowed.any(axis=1)).tolist()
        raise ValueError(f"units {bad} have no allowed level")
    D = np.where(allowed, D, np.inf)

    # exact costs: kept weights of unit u at level k
    total = float(n.sum())
    kept = n[:, None] * (1.0 - S)
    budget = (1.0 - target) * total
    fits = budget * (1 + 1e-12)  # float slack: uniform at exactly the target must fit
    min_kept = np.where(allowed, kept, np.inf).min(axis=1)
    if min_kept.sum() > fits:
        best = 1.0 - float(min_kept.sum()) / total
        raise BudgetInfeasible(
            f"sparsity {target:.4f} unreachable: at most {best:.4f} with the allowed levels",
            cheapest=best,
            requested=target,
        )

    # reference: uniform at the target where every unit allows it, else each unit's sparsest level
    rows = np.arange(U)
    ref = np.argmin(np.where(allowed, kept, np.inf), axis=1)
    at_target = allowed & (S >= target - 1e-12)
    uni = np.where(at_target.any(axis=1), np.argmax(np.where(at_target, kept, -np.inf), axis=1), ref)
    if kept[rows, uni].sum() <= fits:
        ref = uni

    # discretise: cost relative to the reference rounded up, spare budget rounded down; shift the
    # costs so that each unit's cheapest level costs 0 steps (DP indices must be >= 0)
    q = granularity * total
    cost = np.ceil((kept - kept[rows, ref][:, None]) / q - _EPS)
    cost = np.where(allowed, cost, np.inf)
    low = cost.min(axis=1)
    # max(0, .): the sparsest reference passed the feasibility check up to float noise
    spare = int(np.floor(max(0.0, budget - kept[rows, ref].sum()) / q + _EPS)) - int(low.sum())
    cost = np.where(allowed, cost - low[:, None], 0).astype(np.int64)
    C = max(0, min(spare, int(np.where(allowed, cost, 0).max(axis=1).sum())))

    # DP over units: best[b] = min distortion of the units so far using <= b spare steps
    best = np.zeros(C + 1)
    choice = np.zeros((U, C + 1), dtype=np.int32)
    for u in range(U):
        new = np.full(C + 1, np.inf)
        for k in range(D.shape[1]):
            if not allowed[u, k] or cost[u, k] > C:
                continue
            c = cost[u, k]
            cand = np.full(C + 1, np.inf)
            cand[c:] = best[: C + 1 - c] + D[u, k]
            better = cand < new  # strict: the first level listed wins ties
            new[better] = cand[better]
            choice[u, better] = k
        best = new

    # backtrack from the full spare budget
    pick = np.zeros(U, dtype=np.int64)
    b = C
    for u in range(U - 1, -1, -1):
        pick[u] = choice[u, b]
        b -= cost[u, pick[u]]

    # spend the exact leftover (lost to rounding up) on the best single-unit improvements
    slack = budget - kept[rows, pick].sum()
    while True:
        gain = D[rows, pick][:, None] - D  # distortion decrease of moving unit u to level k
        extra = kept - kept[rows, pick][:, None]
        ok = allowed & (gain > 0) & (extra <= slack + 1e-12 * budget)
        if not ok.any():
            break
        u, k = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        slack -= extra[u, k]
        pick[u] = k

    sp = S[rows, pick]
    return Allocation(
        level_index=pick,
        sparsity=sp,
        dropped=pick == K,
        distortion=float(D[rows, pick].sum()),
        kept=float(kept[rows, pick].sum()),
        total=total,
        target=float(target),
        granularity=float(granularity),
    )


@dataclass(frozen=True)
class AdditivityReport:
    """How well the additive model predicts measured distortion (report it with every search)."""

    n: int  # configurations compared
    spearman: float  # rank correlation predicted vs measured (nan when undefined)
    chosen_predicted: float  # predicted distortion of the chosen configuration
    chosen_measured: float  # measured distortion of the chosen configuration

    @property
    def chosen_ratio(self) -> float:
        """measured / predicted for the chosen configuration (> 1: the sum underestimates)."""
        return self.chosen_measured / self.chosen_predicted if self.chosen_predicted else float("nan")


def additivity_report(predicted, measured, chosen: int = 0) -> AdditivityReport:
    """Compare predicted (sum of unit curves) and measured distortions of a few configurations.

    `predicted[i]`, `measured[i]` describe configuration i; `chosen` indexes the one the search
    picked (by convention the first), the others are e.g. random configurations at the same budget.
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    m = np.asarray(measured, dtype=np.float64).ravel()
    if p.shape != m.shape or p.size == 0:
        raise ValueError("predicted and measured must be non-empty and the same length")
    return AdditivityReport(
        n=int(p.size),
        spearman=spearman(p, m),
        chosen_predicted=float(p[chosen]),
        chosen_measured=float(m[chosen]),
    )


def spearman(a, b) -> float:
    """Spearman rank correlation with average ranks for ties; nan if either side is constant."""
    ra, rb = _rank(np.asarray(a, dtype=np.float64)), _rank(np.asarray(b, dtype=np.float64))
    if ra.size < 2 or np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size)
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
