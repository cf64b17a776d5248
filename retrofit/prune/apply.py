"""Stage `prune`: scores, allocation (uniform, OWL, DP over measured distortion curves), masks.

`fit` captures the calibration windows, chooses per-block (or per-unit) sparsities, prunes block after
block and returns the exact masks (bit-packed) with a plan that records every linear's measured
sparsity. `apply` is deterministic: it zeroes the planned weights and removes the planned blocks, so a
run directory restores the same model and an export holds exactly the planned sparsity.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from adaflex.search.knapsack import additivity_report, allocate
from adaflex.search.owl import outlier_ratio, owl_sparsities

from .. import arch
from ..arch import decoder_layers, reference_of
from ..drop.apply import remove_blocks
from ..errors import BudgetInfeasible, UsageError
from ..stage import StageContext, StageResult
from .calibrate import capture, dense_statistics, prune_sequential
from .config import PruneConfig, needs_calibration
from .curves import DROP, CurveCache, CurveMeasurer, Unit, fingerprint, make_units, measure_curves
from .experts import ExpertSlice, unsupported
from .plan import PrunePlan
from .scores import Transposed, block_linears, pack_mask, semi_structured_problems, unpack_mask, wanda_score

# ---- checks before anything is written ----


def check(model, cfg: PruneConfig, where: str) -> None:
    """Settings that depend on the model: N:M divisibility, protected blocks, and whether the budget can
    be met at all (exit 3), decided exactly with the DP on zero curves."""
    try:
        layers = decoder_layers(model)
    except AttributeError:
        raise UsageError(f"{where}: cannot find the decoder blocks of {type(model).__name__}") from None
    if len(layers) == 0:
        raise UsageError(f"{where}: the model has no decoder blocks")
    parts = [m for block in layers for m in block.modules()]
    odd = next(filter(None, (unsupported(m) for m in parts if arch.is_experts(m))), None)
    if odd:  # per-expert statistics re-trace the expert's forward (experts.py)
        raise arch.refuse(model, where, f"prune does not score {odd} yet")
    for b, block in enumerate(layers):
        lin = block_linears(block)
        if not lin:
            raise UsageError(f"{where}: block {b} holds no linear (nn.Linear, Conv1D, experts) to prune")
        if cfg.nm is not None:
            m = cfg.nm[1]
            for name, mod in lin:
                if mod.in_features % m:
                    raise UsageError(f"{where}.pattern: {cfg.pattern} needs every input dimension divisible by {m}; "
                                     f"block {b} {name} has {mod.in_features}")
    bad = [i for i in cfg.protect if not 0 <= i < len(layers)]
    if bad:
        raise UsageError(f"{where}.protect: block {bad[0]} out of range 0..{len(layers) - 1}")
    if cfg.allocation == "owl" and cfg.sparsity > cfg.max_sparsity:
        raise BudgetInfeasible(f"{where}.sparsity: {cfg.sparsity:g} is above max_sparsity {cfg.max_sparsity:g}",
                               cfg.max_sparsity, cfg.sparsity)
    if cfg.allocation == "dp":
        units = make_units(model, cfg.units)
        levels = cfg.level_grid()
        try:
            allocate(np.zeros((len(units), len(levels))), levels, [u.size for u in units], cfg.sparsity,
                     granularity=cfg.granularity, max_sparsity=cfg.max_sparsity,
                     drop_distortion=_drop_vector(cfg, units, [0.0] * len(units)))
        except BudgetInfeasible as e:
            hint = "" if cfg.allow_drop else "; allow_drop or higher levels reach further"
            raise BudgetInfeasible(f"{where}.sparsity: {cfg.sparsity:g} unreachable: at most {e.cheapest:.4f} "
                                   f"with levels up to {max(levels):g}{hint}", e.cheapest, e.requested) from None


def _drop_vector(cfg: PruneConfig, units: list[Unit], values) -> np.ndarray | None:
    if not cfg.allow_drop:
        return None
    return np.array([np.nan if u.block in cfg.protect or v is None else v
                     for u, v in zip(units, values, strict=True)], dtype=float)


# ---- allocation ----


def owl_allocation(model, stats, cfg: PruneConfig) -> tuple[list[float], dict]:
    layers = decoder_layers(model)
    lod, sizes = [], []
    for b, block in enumerate(layers):
        scores = [wanda_score(m.weight, stats[b][n]).numpy() for n, m in block_linears(block)]
        lod.append(outlier_ratio(scores, cfg.owl_m))
        sizes.append(sum(m.weight.numel() for _, m in block_linears(block)))
    s = owl_sparsities(lod, cfg.sparsity, lam=cfg.owl_lambda, sizes=sizes, max_sparsity=cfg.max_sparsity)
    return [float(x) for x in s], {"lod": lod, "lambda": cfg.owl_lambda, "m": cfg.owl_m}


def dp_allocation(measurer: CurveMeasurer, units: list[Unit], cfg: PruneConfig, cache: CurveCache,
                  seed: int) -> tuple[list, dict, dict]:
    """Unit levels (a sparsity, or DROP) minimising the summed distortion; the additivity check.
    Points already in `cache` are not measured again (a resumed run, or another target on the same grid)."""
    target = cfg.sparsity
    levels = cfg.level_grid()
    drop_ok = [cfg.allow_drop and u.block not in cfg.protect for u in units]
    t0 = time.perf_counter()
    curves, dropd, counts = measure_curves(measurer, units, levels, drop_ok, cache)
    t_curves = time.perf_counter() - t0
    sizes = [u.size for u in units]
    drop_vec = _drop_vector(cfg, units, dropd)

    def solve(c, d):
        return allocate(c, levels, sizes, target, granularity=cfg.granularity, max_sparsity=cfg.max_sparsity,
                        drop_distortion=d)

    try:
        alloc = solve(curves, drop_vec)
    except BudgetInfeasible as e:
        raise BudgetInfeasible(f"prune.sparsity: {target:g} unreachable: at most {e.cheapest:.4f}", e.cheapest,
                               e.requested) from None
    t_dp = time.perf_counter() - t0 - t_curves

    def as_levels(a) -> list:
        return [DROP if k == len(levels) else levels[k] for k in a.level_index]

    chosen = as_levels(alloc)
    # additivity: predicted (sum of unit curves) vs measured distortion of the chosen allocation, the
    # uniform one and a few random ones at the same budget (the DP on randomly perturbed curves)
    cur = np.asarray(curves, dtype=float)
    full = np.concatenate([cur, (drop_vec if drop_vec is not None else np.full(len(units), np.inf))[:, None]], 1)
    configs = [("chosen", chosen, alloc.level_index)]
    if round(target, 10) in levels:
        k = levels.index(round(target, 10))
        configs.append(("uniform", [levels[k]] * len(units), np.full(len(units), k)))
    rng = np.random.default_rng(seed)
    for _ in range(cfg.additivity_samples):
        noise = np.exp(rng.normal(0.0, 1.0, size=cur.shape))
        dn = None if drop_vec is None else drop_vec * np.exp(rng.normal(0.0, 1.0, size=len(units)))
        a = solve(cur * noise, dn)
        configs.append(("random", as_levels(a), a.level_index))
    seen, rows = set(), []
    for kind, lv, idx in configs:
        key = tuple(int(i) for i in idx)
        if key in seen:
            continue
        seen.add(key)
        predicted = float(full[np.arange(len(units)), idx].sum())
        rows.append({"kind": kind, "predicted": predicted, "levels": lv})
    for r, m in zip(rows, measurer.configs(units, [r.pop("levels") for r in rows]), strict=True):
        r["measured"] = m
    rep = additivity_report([r["predicted"] for r in rows], [r["measured"] for r in rows], chosen=0)
    additivity = {"configs": len(rows), "spearman": _num(rep.spearman), "chosen_predicted": rep.chosen_predicted,
                  "chosen_measured": rep.chosen_measured, "chosen_ratio": _num(rep.chosen_ratio), "rows": rows}
    dp = {"levels": levels, "units": cfg.units, "granularity": cfg.granularity, "distortion": cfg.distortion,
          "curves": {u.id: c for u, c in zip(units, curves, strict=True)},
          "drop": {u.id: d for u, d in zip(units, dropd, strict=True) if d is not None},
          "unit_levels": {u.id: lv for u, lv in zip(units, chosen, strict=True)},
          "predicted_distortion": alloc.distortion, "additivity": additivity}
    t_add = time.perf_counter() - t0 - t_curves - t_dp
    timing = {"curve_seconds": t_curves, "dp_seconds": t_dp, "additivity_seconds": t_add,
              "curve_points_measured": counts["measured_points"], "curve_points_cached": counts["cached_points"]}
    return chosen, dp, timing


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def targets_from_units(model, units: list[Unit], unit_levels: list) -> tuple[list[dict[str, float]], set[int]]:
    targets = [dict.fromkeys((n for n, _ in block_linears(blk)), 0.0) for blk in decoder_layers(model)]
    dropped = set()
    for u, lv in zip(units, unit_levels, strict=True):
        if lv == DROP:
            dropped.add(u.block)
            continue
        for n in u.names:
            targets[u.block][n] = float(lv)
    return targets, dropped


# ---- fit ----


def fit(ctx: StageContext, cfg: PruneConfig) -> StageResult:
    model = ctx.model
    where = f"recipe: stages.{ctx.index}.prune"
    check(model, cfg, where)
    layers = decoder_layers(model)
    L = len(layers)
    t0 = time.perf_counter()
    need_data = needs_calibration(cfg)
    windows = ctx.calibration if need_data else None
    cap = capture(model, windows, cfg.batch_size) if need_data else None
    extra, metrics = {}, {}
    fixed = (cfg.nm[1] - cfg.nm[0]) / cfg.nm[1] if cfg.nm else None
    dropped: set[int] = set()
    if cfg.allocation == "uniform":
        level = fixed if fixed is not None else cfg.sparsity
        targets = [dict.fromkeys((n for n, _ in block_linears(blk)), level) for blk in layers]
    elif cfg.allocation == "owl":
        stats = dense_statistics(model, cap)
        block_s, extra["owl"] = owl_allocation(model, stats, cfg)
        targets = [dict.fromkeys((n for n, _ in block_linears(blk)), s)
                   for blk, s in zip(layers, block_s, strict=True)]
    else:
        stats = dense_statistics(model, cap) if cfg.score == "wanda" else None
        n_curve = cfg.curve_samples or min(8, windows.shape[0])
        curve_windows = windows[:n_curve]
        measurer = CurveMeasurer(model, curve_windows, stats, cfg.score, cfg.nm, cfg.row_compare, cfg.distortion)
        units = make_units(model, cfg.units)
        settings = {"score": cfg.score, "pattern": cfg.pattern, "row": cfg.row_compare, "units": cfg.units,
                    "distortion": cfg.distortion}
        cache_path = None
        if ctx.state_dir is not None:
            ctx.state_dir.mkdir(parents=True, exist_ok=True)
            cache_path = ctx.state_dir / "curves.json"
        cache = CurveCache(cache_path, fingerprint(model, windows, curve_windows, settings))
        unit_levels, extra["dp"], timing = dp_allocation(measurer, units, cfg, cache, ctx.seed)
        metrics.update(timing)
        metrics["additivity"] = {k: v for k, v in extra["dp"]["additivity"].items() if k != "rows"}
        del measurer
        targets, dropped = targets_from_units(model, units, unit_levels)
    t_search = time.perf_counter() - t0
    masks = prune_sequential(model, cap, targets, cfg.score, cfg.nm, cfg.row_compare, dropped)
    plan, tensors = _plan(model, cfg, targets, masks, dropped, extra)
    metrics.update({"allocation": cfg.allocation, "score": cfg.score, "pattern": cfg.pattern, "target": cfg.sparsity,
                    "achieved": plan["achieved"], "removed_blocks": plan["removed"],
                    "search_seconds": t_search, "prune_seconds": time.perf_counter() - t0 - t_search,
                    "calibration_tokens": cap.tokens if cap is not None else 0})
    if "semi_structured" in plan:
        metrics["semi_structured_ok"] = plan["semi_structured"]["ok"]
    assert len(plan["block_sparsity"]) == L
    return StageResult(plan=plan, tensors=tensors, metrics=metrics)


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def _plan(model, cfg: PruneConfig, targets, masks, dropped: set[int], extra: dict) -> tuple[dict, dict]:
    layers = decoder_layers(model)
    prefix = _layers_prefix(model)
    kept = [b for b in range(len(layers)) if b not in dropped]
    new_index = {b: i for i, b in enumerate(kept)}
    linears, tensors, block_s = [], {}, []
    total = zeros_all = 0
    problems, problems16 = {}, {}
    for b, block in enumerate(layers):
        bt = bz = 0
        for name, mod in block_linears(block):
            w = mod.weight
            n = w.numel()
            target = 1.0 if b in dropped else targets[b][name]
            entry = {"block": b, "name": name, "shape": list(w.shape), "target": target}
            param = f"{name}.weight"
            if isinstance(mod, ExpertSlice):  # `param` names the 3-D parameter, `expert` its slice
                entry["expert"], param = mod.expert, name.rsplit(".", 1)[0]
            elif isinstance(mod, Transposed):  # shape and mask are those of `param` transposed (Conv1D)
                entry["transposed"] = True
            if b in dropped:
                entry.update({"removed": True, "param": None, "pruned": n, "sparsity": 1.0})
                z = n
            else:
                z = n - int(torch.count_nonzero(w))
                keep = masks.get((b, name))
                entry.update({"param": f"{prefix}.{new_index[b]}.{param}",
                              "pruned": 0 if keep is None else int((~keep).sum()), "sparsity": z / n})
                if keep is not None:
                    tensors[f"mask.{b}.{name}"] = pack_mask(keep)
                    if cfg.pattern == "2:4":
                        # a Conv1D would be served by a sparse kernel as the [out, in] linear it computes
                        w = w.contiguous() if isinstance(mod, Transposed) else w
                        p = semi_structured_problems(w)
                        if p:
                            problems[entry["param"]] = p
                        p16 = semi_structured_problems(w, torch.float16)
                        if p16:
                            problems16[entry["param"]] = p16
            linears.append(entry)
            bt, bz = bt + n, bz + z
        block_s.append(bz / bt)
        total, zeros_all = total + bt, zeros_all + bz
    plan = {"num_layers": len(layers), "allocation": cfg.allocation, "score": cfg.score, "pattern": cfg.pattern,
            "target": cfg.sparsity, "achieved": zeros_all / total, "block_sparsity": block_s,
            "removed": sorted(dropped), "kept": kept, "linears": linears, **extra}
    if cfg.pattern == "2:4":
        dtype = str(next(iter(model.parameters())).dtype).removeprefix("torch.")
        plan["semi_structured"] = {"dtype": dtype, "ok": not problems, "problems": problems,
                                   "float16_ok": not problems16, "float16_problems": problems16}
    return plan, tensors


# ---- apply ----


@torch.no_grad()
def apply(model, plan: PrunePlan, tensors: dict | None = None) -> None:
    """Zero the planned weights (exact masks), then remove the planned blocks (the `drop` stage's removal)."""
    tensors = tensors or {}
    reference_of(model)  # pin the dense reference before anything changes
    plan.check_model(model)
    plan.check_tensors(tensors)
    layers = decoder_layers(model)
    mods = [dict(block_linears(blk)) for blk in layers]
    for e in plan.linears:
        key = f"mask.{e.block}.{e.name}"
        if e.removed or key not in tensors:
            continue
        w = mods[e.block][e.name].weight
        w.masked_fill_(~unpack_mask(tensors[key], w.shape), 0)
    if plan.removed:
        remove_blocks(model, plan.kept)
