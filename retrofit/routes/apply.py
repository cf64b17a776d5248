"""Stage `routes`: check, fit (MCTS labels -> routers -> dial), apply (re-attach routers from the tensors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..arch import decoder_layers, reference_of
from ..errors import AdaflexError, UsageError
from ..progress import progress
from ..stage import StageContext, StageResult
from .config import RoutesConfig
from .label import BlockRunner, fingerprint, keep, label_all, summary, to_examples, training_pool
from .plan import RoutesPlan
from .router import Routers, fit_guard
from .runtime import FixedPolicy, RouterPolicy, install, path_counts, runtime_of, uninstall
from .train import teacher_features, train_routers

FALLBACK_ENV = "ADAFLEX_ROUTES_FALLBACK"  # set to "dense" to run a routed model without its routers


def check(model, cfg: RoutesConfig, where: str) -> None:
    """Model-dependent settings: the fixed path's blocks and the budget against the model's depth."""
    L = len(decoder_layers(model))
    if cfg.path is not None:
        path_counts(cfg.path, L, f"{where}.path")
    if cfg.max_executed is not None and cfg.max_executed > 2 * L:
        raise UsageError(f"{where}.max_executed: {cfg.max_executed} is more than 2 x {L} blocks")
    # the training sources themselves are read (and their layout errors reported) at preflight: RunData


def _log(msg: str) -> None:
    print(f"adaflex: {msg}", file=sys.stderr)


@torch.no_grad()
def executed_mean(model, prompts: list[torch.Tensor], pad: int = 0, batch: int = 8) -> float:
    """Mean blocks executed per prompt under the installed routes (prefill decisions, left padding)."""
    rt = runtime_of(model)
    total, n = 0, 0
    prompts = sorted(prompts, key=lambda p: p.shape[1])  # similar lengths per batch: less padding
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        width = max(p.shape[1] for p in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        m = torch.zeros_like(x)
        for r, p in enumerate(chunk):
            x[r, width - p.shape[1]:] = p[0]
            m[r, width - p.shape[1]:] = 1
        model.get_decoder()(input_ids=x, attention_mask=m, use_cache=False)
        total += int(rt.last_routes.sum())
        n += len(chunk)
    return total / max(1, n)


def calibrate_dial(model, routers: Routers, windows: int, prompts, budget: float | None, pad: int,
                   steps: int = 8) -> tuple[float, float]:
    """The largest dial p in [-1, 0] whose mean executed blocks is within the budget on every source of
    prompts (`prompts`: a list of prompts, or a dict source -> list); returns (p, the highest source mean).
    Bisection to 2^-steps of the range (8 steps: 0.03 nats of DIAL_SCALE)."""
    sources = prompts if isinstance(prompts, dict) else {"prompts": prompts}

    def mean_at(p):
        install(model, RouterPolicy(routers, windows, p), routers)
        try:
            return max(executed_mean(model, ps, pad) for ps in sources.values() if ps)
        finally:
            uninstall(model)

    at0 = mean_at(0.0)
    if budget is None or at0 <= budget:
        return 0.0, at0
    # p = -1 leans 8 nats to skip, but only where a label skipped (Routers.allowed): the budget may stay out
    # of reach, and then (-1, its mean) is returned for the caller to report
    lo, hi, lo_mean = -1.0, 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        m = mean_at(mid)
        if m <= budget:
            lo, lo_mean = mid, m
        else:
            hi = mid
    if lo == -1.0:
        lo_mean = mean_at(lo)
    return lo, lo_mean


def dial_prompts(ctx: StageContext, cfg: RoutesConfig, held) -> dict[str, list[torch.Tensor]]:
    """Prompts the auto dial must meet the budget on: `held`, prompts of the training files that were not
    labelled (the routers fit their own training prompts closely and skip more confidently there than on
    new prompts) and, when the recipe has calibration data, the first three quarters of its windows
    (routers trained on a few examples decide differently on long prompts of other text; the budget should
    hold on the data the model will see), except with the out-of-domain guard, which runs other text dense on
    purpose."""
    out = {"train": [ex.prompt for ex in held[: cfg.calibrate_examples]]}
    if ctx.recipe.data.calibration is not None and cfg.guard is None:  # guarded: other text runs dense by design
        cal = ctx.calibration[: cfg.calibrate_examples]
        out["calibration"] = [w[None, : max(2, w.shape[0] * 3 // 4)] for w in cal]
    return out


def expansion_prior(ctx: StageContext, cfg: RoutesConfig, examples) -> list[float] | None:
    """Block influence (ShortGPT) per block, the order in which MCTS tries removals (`expand: influence`):
    measured on the recipe's calibration windows, else on the training prompts."""
    if cfg.expand != "influence":
        return None
    from ..drop.apply import block_influence

    if ctx.recipe.data.calibration is not None:
        return [float(x) for x in block_influence(ctx.model, ctx.calibration)]
    per = [block_influence(ctx.model, ex.prompt, show_progress=False)  # prompts differ in length: one at a time
           for ex in progress(examples[: cfg.calibrate_examples], desc="block influence")]
    return [sum(col) / len(per) for col in zip(*per, strict=True)]


def fit(ctx: StageContext, cfg: RoutesConfig) -> StageResult:
    model, tok = ctx.model, ctx.tokenizer
    where = f"recipe: stages.{ctx.index}.routes"
    check(model, cfg, where)
    L, d = len(decoder_layers(model)), model.config.hidden_size
    base = {"num_layers": L, "hidden_size": d, "windows": cfg.windows, "bottleneck": cfg.bottleneck,
            "fallback_dense": cfg.fallback_dense, "max_executed": cfg.max_executed, "guard": cfg.guard}
    if cfg.path is not None:
        path_counts(cfg.path, L, f"{where}.path")
        return StageResult({**base, "policy": "path", "path": list(cfg.path), "dial": 0.0},
                           metrics={"executed": len(cfg.path)})
    paths = list(cfg.train)
    if not paths:
        cal = ctx.recipe.data.calibration
        if cal is None:
            raise UsageError(f"{where}.train: give MCTS data files (or data.calibration)")
        paths = [cal.path]
    pool = training_pool(cfg, tok, paths, ctx.seed, ctx.run_data)
    examples = to_examples(cfg, tok, pool[: cfg.examples])
    if not examples:
        raise UsageError(f"{where}.train: no usable example in {paths}")
    state = Path(ctx.state_dir) if ctx.state_dir is not None else Path(".adaflex-routes")
    folder = Path(cfg.labels_dir) if cfg.labels_dir else state / "labels"
    fp = fingerprint(cfg, model, paths, ctx.seed)
    _log(f"routes: MCTS over {len(examples)} examples x {cfg.simulations} simulations ({L} blocks)")
    prior = expansion_prior(ctx, cfg, examples)
    records = label_all(model, examples, cfg, folder, fp, ctx.seed, log=_log, prior=prior)
    stats = summary(records, L)
    kept = keep(records, cfg.min_fix_share, ctx.seed)
    if not kept:
        raise AdaflexError(f"{where}: MCTS found no correct path for any example; raise simulations or examples")
    by_index = {ex.index: ex for ex in examples}
    runner = BlockRunner(model)
    feats, wmask = teacher_features(runner, [by_index[r["index"]].prompt for r in kept],
                                    [tuple(r["label"]) for r in kept], cfg.windows)
    labels = torch.tensor([r["counts"] for r in kept], dtype=torch.long)
    seed = ctx.seed if cfg.router_seed is None else cfg.router_seed
    routers, tstats = train_routers(feats, wmask, labels, cfg, seed)
    if cfg.guard is not None and (b0 := routers.first_routed()) is not None:
        w = wmask.float()[..., None]
        try:
            mean, basis, threshold = fit_guard((feats[:, b0] * w).sum(1) / w.sum(1).clamp_min(1), cfg.guard_rank,
                                               cfg.guard)
        except ValueError as e:
            raise UsageError(f"{where}.guard: {e}; label more examples or set guard: null") from None
        routers.set_guard(mean, basis, threshold)
        tstats["guard_threshold"] = threshold
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    held = to_examples(cfg, tok, pool[cfg.examples : cfg.examples + cfg.calibrate_examples])
    prompts = dial_prompts(ctx, cfg, held or examples)  # small training files: the labelled prompts
    if cfg.dial == "auto":
        dial, calibrated = calibrate_dial(model, routers, cfg.windows, prompts, cfg.max_executed, pad)
    else:
        install(model, RouterPolicy(routers, cfg.windows, cfg.dial), routers)
        calibrated = max(executed_mean(model, ps, pad) for ps in prompts.values() if ps)
        uninstall(model)
        dial = float(cfg.dial)
    if cfg.max_executed is not None and calibrated > cfg.max_executed:
        _log(f"routes: warning: {calibrated:.2f} blocks run on the dial's prompts at dial {dial:.3f}, over "
             f"max_executed {cfg.max_executed} (only blocks some label skipped can be skipped); label more examples "
             "or raise max_executed")
    metrics = {**stats, "kept": len(kept), **tstats, "dial": dial, "calibrated_executed_mean": calibrated}
    _log(f"routes: {stats['labelled']}/{stats['examples']} labelled, {len(kept)} kept; block evaluations "
         f"{stats['block_evals']} vs {stats['block_evals_naive']} naive ({stats['prefix_reuse_saving']:.0%} saved); "
         f"dial {dial:.3f} -> {calibrated:.2f} blocks")
    plan = {**base, "policy": "routers", "dial": dial, "labels": stats}
    tensors = {f"router.{k}": v.detach().clone() for k, v in routers.state_dict().items()}
    return StageResult(plan, tensors, metrics)


def routers_from(tensors: dict, plan: RoutesPlan) -> Routers | None:
    sd = {k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")}
    if not sd:
        return None
    plan.check_tensors(tensors)
    L, d, w = plan.num_layers, plan.hidden_size, sd["blocks.0.0.weight"]
    basis = sd.get("guard_basis")
    routers = Routers(L, d, w.shape[0], guard_rank=0 if basis is None else basis.shape[0])
    sd.setdefault("allowed", routers.allowed)  # routers saved before the class mask: every class allowed
    for k in ("guard_mean", "guard_basis", "guard_threshold"):  # saved before the guard: none
        sd.setdefault(k, getattr(routers, k))
    try:
        routers.load_state_dict(sd)
    except RuntimeError as e:
        raise UsageError(f"routes: router weights do not fit ({str(e).splitlines()[0]})") from None
    return routers.eval()


def apply(model, plan: RoutesPlan, tensors: dict | None = None) -> None:
    """Install the routed runtime: a fixed path, or the routers stored in `tensors` with the plan's dial."""
    reference_of(model)
    plan.check_model(model)
    if plan.policy == "path":
        install(model, FixedPolicy(counts=path_counts(plan.path, plan.num_layers, "routes.path")))
        return
    routers = routers_from(tensors or {}, plan)
    if routers is None:
        if plan.fallback_dense or os.environ.get(FALLBACK_ENV) == "dense":
            _log("routes: router weights missing; running the dense model (fallback asked for)")
            return
        raise UsageError("routes: router weights missing from adaflex.safetensors; set routes.fallback_dense=true "
                         f"or {FALLBACK_ENV}=dense to run the dense model instead")
    install(model, RouterPolicy(routers, plan.windows, plan.dial), routers)
