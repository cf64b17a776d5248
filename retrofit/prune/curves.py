"""Distortion curves for the DP: prune one unit alone at each level and measure how far the model's output
moves from the dense output; only the blocks from the pruned unit onwards are re-run (their dense
inputs are cached). Points are cached on disk as they are measured, so a resumed run redoes none."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import arch, io
from ..arch import decoder_layers
from ..progress import progress
from .calibrate import Captured
from .scores import block_linears, keep_mask, score_of, score_ranks

DROP = "drop"


@dataclass(frozen=True)
class Unit:
    """What gets one sparsity: a block, one sublayer (attention / MLP) of a block, or one linear."""

    id: str
    block: int
    names: tuple[str, ...]
    size: int


def make_units(model, kind: str) -> list[Unit]:
    units = []
    for b, block in enumerate(decoder_layers(model)):
        lin = block_linears(block)
        if kind == "block":
            groups = {str(b): [n for n, _ in lin]}
        elif kind == "sublayer":
            groups = {}
            for n, _ in lin:
                groups.setdefault(f"{b}.{n.split('.')[0]}", []).append(n)
        else:
            groups = {f"{b}.{n}": [n] for n, _ in lin}
        sizes = {n: m.weight.numel() for n, m in lin}
        units += [Unit(uid, b, tuple(ns), sum(sizes[n] for n in ns)) for uid, ns in groups.items()]
    return units


def level_key(level) -> str:
    return DROP if level == DROP else f"{float(level):.10g}"


# ---- the dense trace and the distortion measure ----


@torch.no_grad()
def dense_trace(model, cap: Captured, desc: str = "prune: dense trace") -> list[list[torch.Tensor]]:
    """inputs[b][i]: input of block b for batch i on the dense model; inputs[L] is the stack's output."""
    layers = decoder_layers(model)
    xs = list(cap.hidden)
    inputs = [xs]
    for b in progress(range(len(layers)), desc=desc, total=len(layers)):
        xs = [cap.call(b, layers[b], i, x) for i, x in enumerate(xs)]
        inputs.append(xs)
    return inputs


class Distortion:
    """Output distortion against the dense model on the curve windows.

    `mse`: mean over tokens of the squared error of the logits, centred over the vocabulary (a shift of
    all logits changes nothing), divided by the vocabulary size. It is computed exactly through the
    d×d Gram matrix of the centred LM head, so the 49k-class head is never applied: δᵀGδ per token. A model
    whose logits are softcapped (Gemma 2) is not linear in h: its head is applied and the same mean taken.
    `kl`: mean over tokens of KL(dense ‖ pruned) of the next-token distributions.
    """

    def __init__(self, model, dense_out: list[torch.Tensor], kind: str = "mse"):
        self.kind, self.model = kind, model
        self.norm = arch.final_norm(model)
        self.gram = None  # mse on a model whose logits are linear in h
        with torch.no_grad():
            self.ref = [self.norm(h).float() for h in dense_out]
            if kind == "mse" and arch.softcap(model.config) is None:
                w = model.get_output_embeddings().weight.detach().float()
                wc = w - w.mean(0, keepdim=True)
                self.gram = wc.T @ wc / w.shape[0]
            elif kind == "mse":
                self.ref = [arch.logits(model, h) for h in self.ref]
            else:
                self.ref = [torch.log_softmax(arch.logits(model, h), -1) for h in self.ref]

    @torch.no_grad()
    def __call__(self, out: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for ref, h in zip(self.ref, out, strict=True):
            h = self.norm(h).float()
            if self.gram is not None:
                d = (h - ref).reshape(-1, h.shape[-1])
                total += float(((d @ self.gram) * d).sum())
                count += d.shape[0]
            elif self.kind == "mse":  # centred logit differences, as δᵀGδ counts them
                d = (arch.logits(self.model, h) - ref).reshape(-1, ref.shape[-1])
                total += float(((d - d.mean(-1, keepdim=True)) ** 2).sum()) / d.shape[-1]
                count += d.shape[0]
            else:
                logq = torch.log_softmax(arch.logits(self.model, h), -1)
                total += float((ref.exp() * (ref - logq)).sum())
                count += ref.shape[0] * ref.shape[1]
        return total / count


# ---- the cache of measured points ----


class CurveCache:
    """JSON file of measured points {unit id: {level: distortion}}, valid for one fingerprint."""

    def __init__(self, path: Path | None, key: str):
        self.path, self.key = path, key
        self.points: dict[str, dict[str, float]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            if data.get("key") == key:
                self.points = data.get("points", {})

    def get(self, uid: str, level) -> float | None:
        return self.points.get(uid, {}).get(level_key(level))

    def put(self, uid: str, level, value: float) -> None:
        self.points.setdefault(uid, {})[level_key(level)] = value

    def flush(self) -> None:
        if self.path is not None:
            io.write_json(self.path, {"key": self.key, "points": self.points})


def fingerprint(model, windows: torch.Tensor, curve_windows: torch.Tensor, settings: dict) -> str:
    """What the curves depend on: the model's weights (sampled), the calibration windows and settings."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for t in (windows, curve_windows):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 256)].float().numpy().tobytes())
    return h.hexdigest()


# ---- measuring ----


class _Masked:
    """Temporarily zero some linears' weights; restores the exact originals on exit."""

    def __init__(self, mods: list[tuple[torch.nn.Linear, torch.Tensor]]):
        self.mods = mods
        self.saved = []

    def __enter__(self):
        for mod, keep in self.mods:
            self.saved.append(mod.weight.detach().clone())
            mod.weight.data.mul_(keep.to(mod.weight.dtype))
        return self

    def __exit__(self, *exc):
        for (mod, _), w in zip(self.mods, self.saved, strict=False):
            mod.weight.data.copy_(w)


class CurveMeasurer:
    """Distortion of pruning any set of units at given levels, on the curve windows (one batch).

    The dense inputs of every block are cached. A unit's points at several levels are measured together:
    the unit's block runs once per level (pruned at that level), the outputs are stacked along the batch
    and the blocks after it run once on the stack, which keeps the matrix products large.
    """

    def __init__(self, model, windows: torch.Tensor, stats: list[dict] | None, score: str, nm, row: bool,
                 kind: str = "mse", max_tokens: int = 8192):
        from .calibrate import capture

        self.model, self.windows = model, windows
        self.cap = capture(model, windows, batch_size=windows.shape[0])
        self.layers = decoder_layers(model)
        self.stats, self.score, self.nm, self.row = stats, score, nm, row
        self.trace = [xs[0] for xs in dense_trace(model, self.cap)]
        self.distortion = Distortion(model, [self.trace[-1]], kind)
        self.group = max(1, max_tokens // windows.numel())
        self._wide: dict[int, Captured] = {}
        self._score_cache: dict = {}

    def _wide_cap(self, k: int) -> Captured:
        if k not in self._wide:
            from .calibrate import capture

            self._wide[k] = self.cap if k == 1 else capture(self.model, self.windows.repeat(k, 1),
                                                            batch_size=k * self.windows.shape[0])
        return self._wide[k]

    def _scored(self, b: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores and their ranks, kept for the block being measured only (memory stays one block's)."""
        key = (b, name)
        if key not in self._score_cache:
            if any(k[0] != b for k in self._score_cache):
                self._score_cache.clear()
            w = dict(block_linears(self.layers[b]))[name].weight
            sc = score_of(w, self.score, self.stats[b].get(name) if self.stats else None)
            self._score_cache[key] = (sc, None if self.nm else score_ranks(sc, self.row))
        return self._score_cache[key]

    def masks(self, b: int, names, level: float) -> list[tuple[torch.nn.Linear, torch.Tensor]]:
        mods = dict(block_linears(self.layers[b]))
        out = []
        for n in names:
            sc, ranks = self._scored(b, n)
            out.append((mods[n], keep_mask(sc, level, self.nm, self.row, ranks=ranks)))
        return out

    @torch.no_grad()
    def _run(self, cap: Captured, start: int, x: torch.Tensor, skip: set[int] = frozenset()) -> torch.Tensor:
        for b in range(start, len(self.layers)):
            if b not in skip:
                x = cap.call(b, self.layers[b], 0, x)
        return x

    @torch.no_grad()
    def points(self, unit: Unit, levels: list) -> list[float]:
        """Distortion of pruning `unit` alone at each level (DROP: the unit's block removed)."""
        out = [0.0] * len(levels)
        todo = [i for i, lv in enumerate(levels) if lv == DROP or lv > 0]
        b = unit.block
        for g in range(0, len(todo), self.group):
            idx = todo[g : g + self.group]
            mids = []
            for i in idx:
                if levels[i] == DROP:
                    mids.append(self.trace[b])
                else:
                    with _Masked(self.masks(b, unit.names, levels[i])):
                        mids.append(self.cap.call(b, self.layers[b], 0, self.trace[b]))
            final = self._run(self._wide_cap(len(idx)), b + 1, torch.cat(mids, 0))
            for i, y in zip(idx, final.chunk(len(idx), 0), strict=True):
                out[i] = self.distortion([y])
        return out

    def point(self, unit: Unit, level) -> float:
        return self.points(unit, [level])[0]

    def config(self, units: list[Unit], levels: list) -> float:
        return self.configs(units, [levels])[0]

    @torch.no_grad()
    def configs(self, units: list[Unit], configs: list[list]) -> list[float]:
        """Distortion of each configuration (every unit pruned at its level at once, one-shot masks from
        the dense statistics). All configurations advance block by block together, so each block's
        scores are ranked once."""
        by_block: list[list[tuple[Unit, int]]] = [[] for _ in self.layers]
        for j, u in enumerate(units):
            by_block[u.block].append((u, j))
        xs = [self.trace[0]] * len(configs)
        for b, block in enumerate(self.layers):
            for c, levels in enumerate(configs):
                mine = [(u, levels[j]) for u, j in by_block[b]]
                if any(lv == DROP for _, lv in mine):
                    continue
                mods = [m for u, lv in mine if lv > 0 for m in self.masks(b, u.names, lv)]
                with _Masked(mods):
                    xs[c] = self.cap.call(b, block, 0, xs[c])
        return [self.distortion([x]) for x in xs]


def measure_curves(measurer: CurveMeasurer, units: list[Unit], levels: list[float], drop: list[bool],
                   cache: CurveCache) -> tuple[list[list[float]], list[float | None], dict]:
    """curves[u][k] at `levels[k]` and the drop distortion of each unit (None where not allowed).
    Points found in `cache` are reused; the cache is written after every unit (resumable)."""
    wanted = [[lv for lv in [*levels, *([DROP] if drop[i] else [])] if lv == DROP or lv > 0]
              for i, u in enumerate(units)]
    todo = [(u, [lv for lv in want if cache.get(u.id, lv) is None])
            for u, want in zip(units, wanted, strict=True)]
    todo = [(u, lvs) for u, lvs in todo if lvs]
    n_todo = sum(len(lvs) for _, lvs in todo)
    for u, lvs in progress(todo, desc="prune: distortion curves", total=len(todo)):
        for lv, d in zip(lvs, measurer.points(u, lvs), strict=True):
            cache.put(u.id, lv, d)
        cache.flush()
    curves = [[0.0 if lv <= 0 else cache.get(u.id, lv) for lv in levels] for u in units]
    dropd = [cache.get(u.id, DROP) if drop[i] else None for i, u in enumerate(units)]
    return curves, dropd, {"measured_points": n_todo, "cached_points": sum(map(len, wanted)) - n_todo}
