"""Stage `width`: check, fit (importance, per-block widths, kept indices), apply (physically narrower
linears), export (a plain smaller config where every block has the same width and the family's config can say
so; else zero-padded weights that `adaflex.retrofit.load` narrows again). retrofit/width/README.md explains the
method and its figures; parts.py what each family's channels and heads own.
"""

from __future__ import annotations

import time

import torch

from ..arch import decoder_layers, reference_of, text_config
from ..errors import UsageError
from ..stage import StageContext, StageResult
from .config import WidthConfig
from .importance import collect, head_columns, keep_indices, refit, scores
from .parts import Parts, dims_of, out_in, parts_of
from .plan import WidthPlan
from .shapes import BlockWidth, Dims, explicit_width, uniform_width
from .shrink import pad_state_hook, shrink_block


def check(model, cfg: WidthConfig, where: str) -> BlockWidth | None:
    """Model-dependent settings: explicit widths valid for the model and its GQA grouping, a fraction that
    every block can reach without losing all its heads or channels. Returns the uniform width (if any)."""
    dims, _ = dims_of(model, where)
    if cfg.fraction is None:
        w, why = explicit_width(dims, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads)
        if why:
            raise UsageError(f"{where}.{why}")
        return w
    try:
        uni = uniform_width(dims, cfg.fraction, cfg.prune, cfg.kv_groups, cfg.channel_multiple)
    except ValueError as e:
        if cfg.allocation == "uniform":
            raise UsageError(f"{where}.fraction: {e}") from None
        uni = None
    if cfg.allocation != "uniform":
        from .search import make_units

        units = make_units(dims, len(decoder_layers(model)), cfg.prune, cfg.kv_groups, cfg.levels,
                           cfg.max_removed, cfg.channel_multiple)
        least = sum(min(u.macs) for u in units) / (dims.block_macs * len(decoder_layers(model)))
        if least > 1 - cfg.fraction + 1e-12:
            raise UsageError(f"{where}.fraction: {cfg.fraction:g} unreachable: the narrowest widths allowed "
                             f"(max_removed {cfg.max_removed:g}, at least one head and {cfg.channel_multiple} "
                             f"channels per block) remove {1 - least:.4f}")
    return uni


def needs_calibration(cfg: WidthConfig) -> bool:
    return True  # importance is measured on calibration text


def _search(ctx: StageContext, cfg: WidthConfig, dims: Dims, parts: Parts, uni: BlockWidth | None, mlp_s, head_s,
            st):
    from .search import Measurer, dp_picks, evolve, kept_macs, make_units, measure_curves, picks_of, widths_of

    L = len(decoder_layers(ctx.model))
    units = make_units(dims, L, cfg.prune, cfg.kv_groups, cfg.levels, cfg.max_removed, cfg.channel_multiple,
                       [uni] if uni is not None else [])
    windows = ctx.calibration[: cfg.curve_samples]
    grams = (st.gram_mlp, st.gram_attn) if cfg.refit else None
    m = Measurer(ctx.model, windows, dims, parts, mlp_s, head_s, cfg.distortion, grams, cfg.refit_damp)
    total = dims.block_macs * L
    curve_evals = sum(len(u.options) - 1 for u in units)
    info: dict = {"units": len(units), "curve_evaluations": curve_evals}
    start = picks_of(units, [uni] * L) if uni is not None else [len(u.options) - 1 for u in units]
    if cfg.allocation == "dp":
        curves = measure_curves(m, units)
        info["block_forwards"] = m.block_forwards
        picks, predicted = dp_picks(units, curves, cfg.fraction, total)
        info.update({"evaluations": m.evaluations, "predicted_distortion": predicted,
                     "curves": {f"{u.block}.{u.kind}": c for u, c in zip(units, curves, strict=True)}})
    else:
        budget = (1 - cfg.fraction) * total
        n = cfg.evaluations or curve_evals
        picks, _, trace = evolve(m, units, start, budget, n, cfg.offspring, ctx.seed)
        info.update({"evaluations": m.evaluations, "block_forwards": m.block_forwards, "trace": trace})
    # both measured once more, outside the search's count: the chosen widths and the uniform ones
    info["distortion"] = m.config(units, picks)
    if uni is not None:
        info["uniform_distortion"] = m.config(units, start)
    info["kept_macs"] = kept_macs(units, picks)
    return widths_of(units, picks, L), info


def fit_windows(windows: torch.Tensor, cfg: WidthConfig) -> torch.Tensor:
    """The windows importance (and the refit) learn from: all but the ones the search measures on, when
    there are more (a refit judged on its own data looks better than it is)."""
    if cfg.allocation == "uniform" or windows.shape[0] <= cfg.curve_samples:
        return windows
    return windows[cfg.curve_samples:]


def fit(ctx: StageContext, cfg: WidthConfig) -> StageResult:
    model = ctx.model
    where = f"recipe: stages.{ctx.index}.width"
    uni = check(model, cfg, where)
    dims, parts = dims_of(model, where)
    L = len(decoder_layers(model))
    t0 = time.perf_counter()
    st = collect(model, fit_windows(ctx.calibration, cfg), dims, parts, cfg.batch_size, gram=cfg.refit)
    mlp_s, head_s = scores(model, st, cfg.importance, dims, parts)
    t_imp = time.perf_counter() - t0
    search: dict = {}
    if cfg.allocation == "uniform":
        widths = [uni] * L
    else:
        widths, search = _search(ctx, cfg, dims, parts, uni, mlp_s, head_s, st)
    t_search = time.perf_counter() - t0 - t_imp
    plan, tensors = narrow_plan(model, dims, widths, mlp_s, head_s, st if cfg.refit else None, cfg.refit_damp, parts)
    plan.update({"allocation": cfg.allocation, "importance": cfg.importance, "refit": cfg.refit,
                 "target": cfg.fraction, "search": search})
    metrics = {"allocation": cfg.allocation, "importance": cfg.importance, "target": cfg.fraction,
               "removed": plan["removed"], "uniform": plan["uniform"], "importance_seconds": t_imp,
               "search_seconds": t_search, "calibration_tokens": int(ctx.calibration.numel())}
    metrics.update({k: v for k, v in search.items() if k not in ("curves", "trace")})
    return StageResult(plan=plan, tensors=tensors, metrics=metrics)


def narrow_plan(model, dims: Dims, widths: list[BlockWidth], mlp_s, head_s, st=None, damp: float = 0.01,
                parts: Parts | None = None):
    """The plan core (widths, MACs) and tensors (kept indices; refit weights when `st` holds Gram matrices)
    that `apply` narrows a dense model with."""
    parts = parts or dims_of(model, "width")[1]
    tensors = {}
    for b, (blk, w) in enumerate(zip(decoder_layers(model), widths, strict=True)):
        channels, heads, groups = keep_indices(mlp_s[b], head_s[b], dims, w)
        tensors.update({f"keep.{b}.channels": channels, f"keep.{b}.heads": heads, f"keep.{b}.groups": groups})
        if st is not None:
            tensors[f"refit.{b}.down"] = refit(out_in(parts.down(blk)), st.gram_mlp[b], channels, damp)
            tensors[f"refit.{b}.o"] = refit(out_in(parts.o(blk)), st.gram_attn[b],
                                            head_columns(heads, dims.head_dim), damp)
    kept = sum(dims.macs(w) for w in widths)
    dense = dims.block_macs * len(widths)
    plan = {"num_layers": len(widths), "dense": {"hidden": dims.hidden, "intermediate": dims.intermediate,
                                                 "heads": dims.heads, "kv_heads": dims.kv_heads,
                                                 "head_dim": dims.head_dim, "mlp_matrices": dims.mlp_matrices},
            "widths": [w.to_dict() for w in widths], "uniform": all(w == widths[0] for w in widths),
            "block_macs_kept": kept, "block_macs_dense": dense, "removed": 1 - kept / dense}
    return plan, tensors


@torch.no_grad()
def apply(model, plan: WidthPlan, tensors: dict | None = None) -> None:
    """Narrow every block to its planned width, keeping the planned indices (and refit weights)."""
    tensors = tensors or {}
    reference_of(model)  # pin the dense reference before the shapes change
    layers = decoder_layers(model)
    plan.check_model(model)
    dims = plan.dims
    _, parts = dims_of(model, "width plan")
    plan.check_tensors(tensors)
    for b, blk in enumerate(layers):
        channels, heads, groups = (tensors[f"keep.{b}.{k}"].long() for k in ("channels", "heads", "groups"))
        shrink_block(blk, parts, dims, channels, heads, groups, tensors.get(f"refit.{b}.down"),
                     tensors.get(f"refit.{b}.o"))
    if plain(plan, parts):  # the config describes every block: a plain, smaller model of the same family
        w = plan.width(0)
        cfg = text_config(model.config)
        setattr(cfg, parts.ffn_key, w.channels)
        if parts.head_dim_key:
            cfg.head_dim = dims.head_dim  # explicit: hidden_size // heads no longer gives it
            cfg.num_attention_heads, cfg.num_key_value_heads = w.heads, w.kv_groups


def plain(plan: WidthPlan, parts: Parts) -> bool:
    """Every block has the same width and the family's config can say so: its FFN width key, and fewer heads
    only where the attention reads `config.head_dim` (OPT, GPT-NeoX, GPT-2 take hidden / heads)."""
    w, d = plan.width(0), plan.dims
    return plan.uniform and (parts.head_dim_key or (w.heads, w.kv_groups) == (d.heads, d.kv_heads))


def export_extra(model, plan: WidthPlan, tensors: dict, out_dir, merge: bool) -> dict:
    """Uniform widths the config can describe: the weights and config.json are a plain, smaller model
    (`baked`). Otherwise the weights are written zero-padded to the dense shapes (transformers loads them as
    the dense model, same function) and `adaflex.retrofit.load` narrows them again from the plan."""
    parts = parts_of(model, "width export")
    if plain(plan, parts):
        return {"baked": True, "export": "plain"}
    dims = plan.dims
    for b, blk in enumerate(decoder_layers(model)):
        idx = [tensors[f"keep.{b}.{k}"].long() for k in ("channels", "heads", "groups")]
        blk.register_state_dict_post_hook(pad_state_hook(parts, dims, *idx))
    return {"baked": False, "export": "padded"}
