"""Per-block widths: distortion curves measured one sublayer at a time, the knapsack DP over them
(search/knapsack.py, MACs as the cost) and an EvoPress-style (1+λ) evolutionary search with the measured
distortion of whole configurations as its fitness, on the same number of evaluations.

A narrower sublayer is measured on the dense-shaped model: zeroing the down projection's columns of the
removed FFN channels (o's of the removed heads) computes exactly what the narrow block computes, so one weight
swap per sublayer is all a point costs (the refit replaces the kept columns too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adaflex.search.knapsack import allocate

from ..arch import decoder_layers
from ..progress import progress
from ..prune.calibrate import capture
from ..prune.curves import Distortion, dense_trace
from .importance import head_columns, keep_indices, refit
from .parts import Parts, out_in, to_module
from .shapes import BlockWidth, Dims, attn_options, mlp_options


@dataclass(frozen=True)
class Unit:
    """One sublayer whose width is chosen: `options` widest first (an FFN channel count, or (groups, r))."""

    block: int
    kind: str  # "attn" or "mlp"
    options: tuple
    macs: tuple[int, ...]  # MACs per token of each option


def make_units(dims: Dims, n_blocks: int, prune: str, kv_groups: bool, levels: int, max_removed: float,
               multiple: int, uniform=()) -> list[Unit]:
    """Units in block order; the `uniform` widths are always among the options (so uniform is reachable)."""
    mlp = tuple(mlp_options(dims, levels, max_removed, multiple, [u.channels for u in uniform])) \
        if prune != "attention" else (dims.intermediate,)
    att = set(attn_options(dims, kv_groups, max_removed)) if prune != "mlp" else {(dims.kv_heads, dims.per_group)}
    att |= {(u.kv_groups, u.per_group) for u in uniform}
    att = tuple(sorted(att, key=lambda gr: (-dims.attn_macs(*gr), -gr[0])))
    units = []
    for b in range(n_blocks):
        units.append(Unit(b, "attn", att, tuple(dims.attn_macs(*gr) for gr in att)))
        units.append(Unit(b, "mlp", mlp, tuple(dims.mlp_macs(c) for c in mlp)))
    return units


def widths_of(units: list[Unit], picks, n_blocks: int) -> list[BlockWidth]:
    out = [[None, None] for _ in range(n_blocks)]
    for u, k in zip(units, picks, strict=True):
        out[u.block][0 if u.kind == "attn" else 1] = u.options[int(k)]
    return [BlockWidth(c, *gr) for gr, c in out]


def picks_of(units: list[Unit], widths: list[BlockWidth]) -> list[int]:
    return [u.options.index((widths[u.block].kv_groups, widths[u.block].per_group) if u.kind == "attn"
                            else widths[u.block].channels) for u in units]


class Measurer:
    """Distortion (KL or logit MSE, prune.curves.Distortion) of narrower sublayers on the curve windows.
    Counts the evaluations and the block forwards they cost, so DP and evolution compare on equal terms."""

    def __init__(self, model, windows: torch.Tensor, dims: Dims, parts: Parts, mlp_scores, head_scores,
                 kind: str = "kl", grams: tuple[list, list] | None = None, damp: float = 0.01):
        self.layers = decoder_layers(model)
        self.parts = parts
        self.dims, self.mlp_scores, self.head_scores = dims, mlp_scores, head_scores
        self.grams, self.damp = grams, damp
        self.cap = capture(model, windows, batch_size=windows.shape[0])
        self.trace = [xs[0] for xs in dense_trace(model, self.cap, desc="width: dense trace")]
        self.distortion = Distortion(model, [self.trace[-1]], kind)
        self.evaluations = 0
        self.block_forwards = 0
        self._swaps: dict = {}  # evolution revisits the same sublayer widths: each weight (refit) made once

    def swap(self, b: int, kind: str, option) -> tuple[torch.nn.Linear, torch.Tensor]:
        """The dense-shaped weight that makes sublayer `kind` of block b compute its narrow version."""
        key = (b, kind, option)
        if key not in self._swaps:
            self._swaps[key] = self._make_swap(b, kind, option)
        return self._swaps[key]

    def _make_swap(self, b: int, kind: str, option) -> tuple[torch.nn.Linear, torch.Tensor]:
        d = self.dims
        if kind == "mlp":
            lin = self.parts.down(self.layers[b])
            w = BlockWidth(option, d.kv_heads, d.per_group)
            cols = keep_indices(self.mlp_scores[b], self.head_scores[b], d, w)[0]
            gram = self.grams[0][b] if self.grams else None
        else:
            lin = self.parts.o(self.layers[b])
            heads = keep_indices(self.mlp_scores[b], self.head_scores[b], d, BlockWidth(d.intermediate, *option))[1]
            cols = head_columns(heads, d.head_dim)
            gram = self.grams[1][b] if self.grams else None
        w = out_in(lin)
        new = torch.zeros_like(w)
        new[:, cols] = refit(w, gram, cols, self.damp) if gram is not None else w[:, cols]
        return lin, to_module(lin, new)

    @torch.no_grad()
    def _run(self, start: int, x: torch.Tensor, swaps: dict[int, list]) -> float:
        for b in range(start, len(self.layers)):
            saved = [(lin, lin.weight.data) for lin, _ in swaps.get(b, [])]
            try:
                for lin, w in swaps.get(b, []):
                    lin.weight.data = w
                x = self.cap.call(b, self.layers[b], 0, x)
            finally:
                for lin, w in saved:
                    lin.weight.data = w
        self.evaluations += 1
        self.block_forwards += len(self.layers) - start
        return self.distortion([x])

    def point(self, unit: Unit, k: int) -> float:
        """Distortion of `unit` alone at its option k (the others dense)."""
        if k == 0:  # the widest option is the dense sublayer
            return 0.0
        return self._run(unit.block, self.trace[unit.block], {unit.block: [self.swap(unit.block, unit.kind,
                                                                                      unit.options[k])]})

    def config(self, units: list[Unit], picks) -> float:
        """Distortion of every unit at its pick at once."""
        swaps: dict[int, list] = {}
        for u, k in zip(units, picks, strict=True):
            if k:
                swaps.setdefault(u.block, []).append(self.swap(u.block, u.kind, u.options[int(k)]))
        return self._run(0, self.trace[0], swaps)


def measure_curves(m: Measurer, units: list[Unit]) -> list[list[float]]:
    return [[m.point(u, k) for k in range(len(u.options))]
            for u in progress(units, desc="width: distortion curves", total=len(units))]


def dp_picks(units: list[Unit], curves: list[list[float]], fraction: float, total_macs: float,
             granularity: float = 1e-3) -> tuple[list[int], float]:
    """Option per unit minimising the summed distortion with at least `fraction` of `total_macs` (all block
    MACs, pruned or not) removed: the multiple-choice knapsack of search/knapsack.py, each option's
    removed share of its unit as the level. Returns (picks, predicted distortion)."""
    removed = [[round(1 - mc / u.macs[0], 10) for mc in u.macs] for u in units]
    levels = sorted({x for r in removed for x in r})
    col = {x: i for i, x in enumerate(levels)}
    D = np.full((len(units), len(levels)), np.nan)
    for i, (r, c) in enumerate(zip(removed, curves, strict=True)):
        for x, v in zip(r, c, strict=True):
            D[i, col[x]] = v
    sizes = [u.macs[0] for u in units]
    target = fraction * total_macs / sum(sizes)
    alloc = allocate(D, levels, sizes, min(target, 1.0), granularity=granularity)
    picks = [removed[i].index(levels[k]) for i, k in enumerate(alloc.level_index)]
    return picks, alloc.distortion


def kept_macs(units: list[Unit], picks) -> int:
    return sum(u.macs[int(k)] for u, k in zip(units, picks, strict=True))


def evolve(m: Measurer, units: list[Unit], start: list[int], budget: float, evaluations: int, offspring: int,
           seed: int) -> tuple[list[int], float, list[tuple[int, float]]]:
    """(1+λ) evolution (EvoPress): each child moves a few units one option narrower and others one wider,
    is repaired into the MACs budget (kept MACs ≤ budget) and spends what is left on random widenings; the
    best child replaces the parent when its measured distortion is not worse. Stops after `evaluations`
    measured configurations (the parent's counted). Returns (best picks, its distortion, trace)."""
    rng = np.random.default_rng(seed)
    last = [len(u.options) - 1 for u in units]

    def cost(p):
        return kept_macs(units, p)

    def mutate(parent):
        child = list(parent)
        for _ in range(int(rng.integers(1, 4))):
            wide = [i for i, k in enumerate(child) if k > 0]
            narrow = [i for i, k in enumerate(child) if k < last[i]]
            if not wide or not narrow:
                break
            child[int(rng.choice(narrow))] += 1
            child[int(rng.choice(wide))] -= 1
        while cost(child) > budget:
            narrow = [i for i, k in enumerate(child) if k < last[i]]
            child[int(rng.choice(narrow))] += 1
        for i in rng.permutation(len(units)):
            if child[i] > 0 and cost(child) - units[i].macs[child[i]] + units[i].macs[child[i] - 1] <= budget:
                child[i] -= 1
        return child

    parent = list(start)
    fit = m.config(units, parent)
    used, trace, seen = 1, [(1, fit)], {tuple(parent)}
    while used < evaluations:
        kids = []
        for _ in range(50 * offspring):
            if len(kids) == min(offspring, evaluations - used):
                break
            c = mutate(parent)
            if tuple(c) not in seen:
                seen.add(tuple(c))
                kids.append(c)
        if not kids:
            break
        scores = [m.config(units, c) for c in kids]
        used += len(kids)
        best = int(np.argmin(scores))
        if scores[best] <= fit:
            parent, fit = kids[best], scores[best]
        trace.append((used, fit))
    return parent, fit, trace
