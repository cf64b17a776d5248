"""Stage `kv`: install budgeted caches on a model, and fit the offline plans (PrefixKV, searched).

`apply(model, plan)` is deterministic and cheap: it registers the attention function, switches the
model to it and gives the model a cache factory (`model.adaflex.make_cache`) (used by the evaluator and by
`generate()` when no cache is passed). Nothing is baked into the weights: an export carries the plan
in its config block and `adaflex.retrofit.load` re-applies it.

Allocations:
    uniform, pyramid   computed for each prompt length at run time
    cake               run time: per-prompt layer preferences, cascading eviction during prefill
    prefixkv           offline: per calibration window, PrefixKV's shared attention-mass threshold gives
                       per-layer retained fractions; their average is shipped as a static plan
    searched           offline: coordinate search over per-layer fractions (contiguous layer groups),
                       started from the best of uniform / pyramid / CAKE-average / PrefixKV, against the
                       continuation NLL of the calibration windows through the compressed cache; with
                       `layer_gains` also from plans that give full caches to the layers (with `head_gains`:
                       the KV heads) whose full cache lowers that NLL most, moving single layers (heads)
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F

from adaflex.search import kv_alloc

from .. import arch
from ..arch import decoder_layers, head_dim, kv_heads, reference_of
from ..errors import UsageError
from ..progress import progress
from ..stage import StageContext, StageResult
from ..state import state_of
from .attention import profile, received_mass, register, window_probs
from .cache import BudgetedCache
from .config import KVConfig, needs_calibration
from .plan import KVPlan
from .policies import layer_preference, make_policy
from .replay import record_prefill, replay
from .spec import KVSpec, storage_bytes_per_value

# ---- installing ----


def spec_from(cfg: KVConfig, num_layers: int, fractions=None, model=None, head_fractions=None) -> KVSpec:
    """The cache spec of a stage's settings; with `model`, the byte cost of the storage type is resolved.
    `fractions`: a static plan per layer [L], or per KV head [L, H]; `head_fractions` [L, H]: a per-head plan next to
    its per-layer means (a stored plan carries both)."""
    if fractions is not None and np.ndim(fractions) == 2:
        fractions, head_fractions = None, fractions
    bpv, windows = 1.0, None
    if model is not None:
        bpv = storage_bytes_per_value(cfg.storage, next(model.parameters()).dtype, head_dim(model.config))
        windows = arch.windows(model.config) if any(arch.windows(model.config)) else None
    return KVSpec(storage=cfg.storage, bytes_per_value=bpv, num_layers=num_layers,
                  policy=make_policy(cfg.policy, cfg.kernel, cfg.gamma, cfg.stat, cfg.heads, cfg.value_norm),
                  budget=cfg.budget if cfg.tokens is None else None, tokens=cfg.tokens, allocation=cfg.allocation,
                  sinks=cfg.sinks, window=cfg.window, recent=cfg.recent, floor=cfg.floor, beta=cfg.beta,
                  tau1=cfg.tau1, tau2=cfg.tau2, decode=cfg.decode,
                  fractions=None if fractions is None else [float(f) for f in fractions],
                  head_fractions=None if head_fractions is None else np.asarray(head_fractions, float).tolist(),
                  windows=windows, extra={"query_agnostic": cfg.query_agnostic})


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
        model_kwargs["cache"] = self.adaflex.make_cache()
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)


def install(model, spec: KVSpec) -> None:
    """Make `model` run with budgeted caches of `spec` (evaluator, generate(), direct forward with one)."""
    st = state_of(model)
    st.patched("kv", _undo, model.config._attn_implementation)
    _set_attention(model, register())
    st.kv = spec
    st.make_cache = lambda: BudgetedCache(spec)
    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)


def _set_attention(model, name: str) -> None:
    model.config._attn_implementation = name
    for mod in model.modules():  # sub-configs share the setting
        cfg = getattr(mod, "config", None)
        if cfg is not None and cfg is not model.config:
            cfg._attn_implementation = name


def uninstall(model) -> None:
    """Back to the attention implementation the model had before `install` (sdpa when unknown)."""
    st = state_of(model)
    _set_attention(model, st.unpatched("kv") or "sdpa")
    st.kv = st.make_cache = None
    model.__dict__.pop("_prepare_cache_for_generation", None)


def _undo(model, _saved) -> None:
    uninstall(model)


# ---- checks ----


def check(model, cfg: KVConfig, where: str) -> None:
    """Settings that depend on the model: the layer count of an explicit plan. (Sliding windows and attention-logit
    softcapping: the attention function applies what each module passes, attention.py.)"""
    n = len(decoder_layers(model))
    if cfg.plan is not None and len(cfg.plan) != n:
        raise UsageError(f"{where}.plan: has {len(cfg.plan)} per-layer fractions, the model has {n} layers")


def _check_budget_vs_length(cfg: KVConfig, length: int, where: str) -> None:
    if cfg.tokens is None and cfg.budget * length < cfg.sinks + cfg.window:
        raise UsageError(f"{where}.budget: {cfg.budget} of {length} tokens is {cfg.budget * length:.0f} tokens, "
                         f"smaller than sinks + window = {cfg.sinks + cfg.window}")


# ---- offline profiles ----


@torch.no_grad()
def attention_profiles(model, windows: torch.Tensor, window: int, tau1=1.0, tau2=1.0):
    """Per calibration window and layer: PrefixKV's cumulative attention-mass curve and CAKE's preference."""
    n = len(decoder_layers(model))
    curves, prefs = [], []
    for row in progress(range(windows.shape[0]), desc="kv profile", total=windows.shape[0]):
        cur, pref = [None] * n, [0.0] * n

        def watch(i, query, key, valid, scaling, groups, cur=cur, pref=pref, reach=None, softcap=None):
            # attention received by each key from all queries, mean over heads
            mass = received_mass(query, key, valid, scaling, groups, reach=reach, softcap=softcap)
            cur[i] = kv_alloc.cumulative_mass(mass.mean(dim=1).sum(0).double().numpy())
            probs = window_probs(query, key, valid, scaling, min(window, query.shape[2]), groups, reach, softcap)
            h, v = layer_preference(probs, window)
            pref[i] = float(kv_alloc.cake_preference([h], [v], tau1, tau2)[0])

        cache = model.adaflex.make_cache()
        with profile(watch):
            model.get_decoder()(input_ids=windows[row:row + 1], cache=cache, use_cache=True)
        curves.append(cur)
        prefs.append(pref)
    return curves, np.array(prefs)


def prefixkv_plan(curves, fraction: float, floor: int) -> np.ndarray:
    """Average over windows of PrefixKV's per-layer retained fractions at a global `fraction`."""
    plans = []
    for cur in curves:
        length = len(cur[0])
        total = int(round(fraction * length * len(cur)))
        total = max(total, min(floor, length) * len(cur))
        counts = kv_alloc.prefixkv(cur, total, min_keep=min(floor, length))
        plans.append(counts / length)
    return kv_alloc.average_plans(plans)


def cake_plan(prefs: np.ndarray, fraction: float, length: int, floor: int) -> np.ndarray:
    plans = []
    for p in prefs:
        total = max(int(round(fraction * length * len(p))), min(floor, length) * len(p))
        plans.append(kv_alloc.cake(p, total, lengths=length, min_keep=min(floor, length)) / length)
    return kv_alloc.average_plans(plans)


# ---- calibration objective ----


@torch.no_grad()
def continuation_nll(model, cache: BudgetedCache, record, continuation: torch.Tensor) -> tuple[float, int]:
    """Sum of NLL of `continuation` [B, N] after a replayed (compressed) prefill, and the token count."""
    # eviction after the continuation's attention cannot change its logits: skip it (~12% of a calibration
    # evaluation on SmolLM2)
    cache.frozen = True
    out = model(input_ids=continuation, cache=cache, use_cache=True)
    logits = torch.cat([record.logits[:, None], out.logits[:, :-1].float()], dim=1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), continuation.reshape(-1), reduction="sum")
    return float(nll), continuation.numel()


class CalibrationObjective:
    """Mean continuation NLL over calibration windows for a per-layer static plan; prefill recorded once."""

    def __init__(self, model, windows: torch.Tensor, cfg: KVConfig):
        t = windows.shape[1]
        self.cont = max(8, t // 4)
        self.ctx = t - self.cont
        self.model, self.cfg = model, cfg
        # one batch: plans are static per-layer counts and scores are per row, so batching changes nothing but
        # the number of forwards
        mass = make_policy(cfg.policy).needs_mass
        self.records = [(record_prefill(model, windows[:, :self.ctx], window=cfg.window, mass=mass),
                         windows[:, self.ctx:])]
        self.n = len(decoder_layers(model))
        self.heads = kv_heads(model.config)
        self.calls = 0  # evaluations run (a plan met again is answered from `_seen`)
        self._seen: dict = {}

    def __call__(self, fractions, budget: float | None = None) -> float:
        """`fractions`: per layer [L], or per KV head [L, H] (or flat [L·H]); `budget`: the total to scale the plan
        to, instead of the stage's (fractions are proportions)."""
        cfg = self.cfg if budget is None else self.cfg.model_copy(update={"budget": budget, "tokens": None})
        f = np.asarray(fractions, dtype=np.float64)
        if f.size == self.n * self.heads and self.heads > 1:
            f = f.reshape(self.n, self.heads)
            if np.allclose(f, f[:, :1]):  # the same plan as its per-layer form: one forward for both
                f = f[:, 0]
        # the layer gains' uniform baseline is also the search's uniform candidate: one forward for both
        key = (cfg.model_dump_json(), f.shape, tuple(np.round(f.ravel(), 9)))
        if key not in self._seen:
            self.calls += 1
            spec = spec_from(cfg, self.n, f, self.model)
            tot, cnt = 0.0, 0
            for rec, cont in self.records:
                nll, c = continuation_nll(self.model, replay(spec, rec), rec, cont)
                tot, cnt = tot + nll, cnt + c
            self._seen[key] = tot / cnt
        return self._seen[key]


def _normalise(f: np.ndarray, mean: float, floor_frac: float) -> np.ndarray:
    """Fractions in [floor, 1] with the given mean (water-filling over the layers)."""
    n = len(f)
    lo = np.full(n, min(floor_frac, mean))
    return kv_alloc.water_fill(np.maximum(f, 1e-9), mean * n, lo, np.ones(n))


def coordinate_search(objective, start: np.ndarray, mean: float, floor_frac: float, groups, trials: int,
                      log=None) -> tuple[np.ndarray, float, list]:
    """Greedy coordinate search: move budget between layer groups while the objective improves.

    `groups`: a count of contiguous groups, or the groups themselves (lists of layer indices). Each move scales one
    group by (1 + step) and renormalises to the same mean; steps shrink when a full sweep finds nothing."""
    n = len(start)
    if isinstance(groups, int):
        bounds = np.linspace(0, n, min(groups, n) + 1).round().astype(int)
        groups = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    best = _normalise(start, mean, floor_frac)
    best_val = objective(best)
    history = [best_val]
    used, step = 1, 0.5
    while used < trials and step > 0.05:
        improved = False
        for g, layers in enumerate(groups):
            for sign in (1, -1):
                if used >= trials:
                    break
                cand = best.copy()
                cand[layers] *= 1 + sign * step
                cand = _normalise(cand, mean, floor_frac)
                if np.allclose(cand, best, atol=1e-4):
                    continue
                val = objective(cand)
                used += 1
                history.append(val)
                if val < best_val - 1e-6:
                    best, best_val, improved = cand, val, True
                    if log:
                        log(f"searched: group {g} {'+' if sign > 0 else '-'}{step:.2f} -> {val:.4f}")
        if not improved:
            step /= 2
    return best, best_val, history


def layer_gains(objective, mean: float, n: int) -> np.ndarray:
    """Per layer: how much the calibration NLL drops when that layer alone keeps all its tokens, the others keeping
    `mean`. Eviction hurts a few layers far more than the rest: on SmolLM2 the ones that copy from far back (block
    18 alone at full cache takes a 25% budget's perplexity on WikiText-2 from 1.42x to 1.24x the full cache's)."""
    base = objective(np.full(n, mean))
    more = mean + (1 - mean) / n  # the total with one layer at full cache
    layers = progress(range(n), desc="kv layer gains", total=n)
    return np.array([base - objective(np.where(np.arange(n) == i, 1.0, mean), budget=more) for i in layers])


def head_gains(objective, mean: float, n: int, heads: int, layers) -> np.ndarray:
    """[L, H]: how much the calibration NLL drops when one KV head of one of `layers` alone keeps all its tokens, the
    others keeping `mean` (0 for the heads of other layers). A layer's gain sits in one of its heads on SmolLM2: block
    18's head 2 alone takes WikiText-2 from 1.42x to 1.24x, its other two heads gain nothing."""
    base = objective(np.full(n, mean))
    more = mean + (1 - mean) / (n * heads)
    gains = np.zeros((n, heads))
    units = [(int(i), h) for i in layers for h in range(heads)]
    for i, h in progress(units, desc="kv head gains", total=len(units)):
        f = np.full((n, heads), mean)
        f[i, h] = 1.0
        gains[i, h] = base - objective(f, budget=more)
    return gains


# promotion counts tried for single KV heads (they are many: counts spaced out, no pairs)
HEAD_SIZES = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24)


def measure_gains(objective, cfg: KVConfig, mean: float, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Layer gains, and with `head_gains` the head gains of the layers of largest gain (else None)."""
    gains = layer_gains(objective, mean, n)
    if not cfg.head_gains or objective.heads < 2:
        return gains, None
    return gains, head_gains(objective, mean, n, objective.heads, np.argsort(-gains, kind="stable")[:cfg.head_gains])


def search_plan(objective, cfg: KVConfig, n: int, mean: float, cake_average, prefixkv,
                gains=None) -> tuple[np.ndarray, dict]:
    """The `searched` allocation: the best of uniform, pyramid, CAKE-average, PrefixKV and (with `layer_gains`) the
    plans promoting the layers, or with `head_gains` the KV heads, of largest measured gain, refined by coordinate
    search; and what it measured. Returns per-layer fractions [L], or per-head ones [L, H] when heads were measured.
    `gains`: `measure_gains`' answer measured before (at another budget, say) instead of measuring here."""
    floor_frac = cfg.floor / objective.ctx
    cands = {"uniform": np.full(n, mean), "pyramid": kv_alloc.pyramid(n, 10**6, beta=cfg.beta) / 10**6 * n * mean,
             "cake_average": np.asarray(cake_average), "prefixkv": np.asarray(prefixkv)}
    found: dict = {}
    units = None  # gains of what the search moves: layers, or KV heads (flattened [L·H])
    if cfg.layer_gains:
        layers, heads = measure_gains(objective, cfg, mean, n) if gains is None else gains
        heads = None if heads is None else np.asarray(heads)
        found["layer_gains"] = np.asarray(layers).round(5).tolist()
        if heads is None:
            units = np.asarray(layers)
            cands.update(kv_alloc.promotion_plans(units, mean, floor_frac))
        else:
            found["head_gains"] = heads.round(5).tolist()
            units = heads.ravel()
            cands = {k: np.repeat(np.asarray(v, dtype=np.float64), heads.shape[1]) for k, v in cands.items()}
            cands.update(kv_alloc.promotion_plans(units, mean, floor_frac, pairs=0, sizes=HEAD_SIZES))
    trials = max(1, cfg.trials - len(cands))
    scored = {k: objective(_normalise(v, mean, floor_frac)) for k, v in cands.items()}
    start = min(scored, key=scored.get)
    # with gains, single layers (heads) move, those of largest gain first (a plan's quality hangs on a few of them)
    groups = cfg.groups if units is None else [[int(i)] for i in np.argsort(-units, kind="stable")[:cfg.groups]]
    fractions, val, _ = coordinate_search(objective, cands[start], mean, floor_frac, groups, trials)
    if fractions.size != n:
        fractions = fractions.reshape(n, -1)
    found.update({"search_start": start, "candidates_nll": scored, "searched_nll": val, "evaluations": objective.calls})
    return fractions, found


# ---- fit / apply ----


def fit(ctx: StageContext, cfg: KVConfig) -> StageResult:
    where = f"recipe: stages.{ctx.index}.kv"
    check(ctx.model, cfg, where)
    n = len(decoder_layers(ctx.model))
    plan = {"num_layers": n, "config": cfg.model_dump(mode="json"), "fractions": cfg.plan}
    metrics: dict = {"allocation": cfg.allocation, "policy": cfg.policy}
    if needs_calibration(cfg):
        windows = ctx.calibration
        _check_budget_vs_length(cfg, windows.shape[1], where)
        samples = cfg.calibration_samples or min(8, windows.shape[0])
        windows = windows[:samples]
        length = windows.shape[1]
        mean = cfg.budget if cfg.tokens is None else min(1.0, cfg.tokens / length)
        install(ctx.model, spec_from(cfg.model_copy(update={"budget": 1.0, "tokens": None}), n))
        try:
            curves, prefs = attention_profiles(ctx.model, windows, cfg.window, cfg.tau1, cfg.tau2)
            pkv = prefixkv_plan(curves, mean, cfg.floor)
            plan["prefixkv"] = pkv.round(6).tolist()
            plan["cake_average"] = cake_plan(prefs, mean, length, cfg.floor).round(6).tolist()
            if cfg.allocation == "prefixkv":
                fractions = pkv
            else:
                objective = CalibrationObjective(ctx.model, windows, cfg)
                fractions, found = search_plan(objective, cfg, n, mean, np.array(plan["cake_average"]), pkv)
                metrics.update(found)
        finally:
            install(ctx.model, spec_from(cfg, n, model=ctx.model))
        fractions = np.asarray(fractions)
        if fractions.ndim == 2:  # per KV head; the per-layer means stay for reports
            plan["head_fractions"] = fractions.round(6).tolist()
            fractions = fractions.mean(1)
        plan["fractions"] = [float(x) for x in fractions.round(6)]
    elif ctx.recipe.data.calibration is not None:
        _check_budget_vs_length(cfg, ctx.recipe.data.calibration.seq_len, where)
    if plan["fractions"] is not None:
        metrics["fractions_min"] = min(plan["fractions"])
        metrics["fractions_max"] = max(plan["fractions"])
    return StageResult(plan=plan, metrics=metrics)


def apply(model, plan: KVPlan, tensors: dict | None = None) -> None:
    reference_of(model)
    plan.check_model(model)
    install(model, spec_from(plan.config, plan.num_layers, plan.fractions, model, plan.head_fractions))


def budget_tokens(spec: KVSpec, length: int) -> int:
    return int(math.ceil(spec.total(length) / spec.num_layers))
