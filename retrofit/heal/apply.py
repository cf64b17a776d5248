"""Stage `heal`: fit (train what the recipe names, every earlier decision active), apply, export.

Tensors of the stage (under `stages.{i}.heal.` in adaflex.safetensors):
    weight.{param}        the trained norms, head and last blocks (base parameter names)
    adapter.{...}         the adapters, in the `shards` stage's layout (retrofit/shards/apply.py)
    replace.{j}.a / .b    the replacement of run j: A [r, d], B [d, r]

`apply` copies the weights, installs the adapters and merges each into its base weight unless that weight is
pruned (merging a dense ΔW would fill its zeros: those adapters stay unmerged, listed in plan.unmerged),
and installs the replacements. An export bakes the weights and merges; its plan says `weights_baked`.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from ..arch import decoder_layers
from ..errors import UsageError
from ..shards import apply as shards
from ..shards.layer import adapted, detach, merge, remove_all
from ..shards.train import windows_for
from ..stage import StageContext, StageResult
from . import replace as rp
from .config import HealConfig
from .config import check_last as last_stage
from .plan import HealPlan, adapter_tensors
from .train import TopKTeacher, heal, mean_kl, steps_for, world

PRUNED = 0.01  # a linear with at least this share of exact zeros is pruned: its adapter is not merged


def _log(msg: str) -> None:
    if world()[0] == 0:
        print(f"adaflex: {msg}", file=sys.stderr)


def check(model, cfg: HealConfig, where: str) -> None:
    if "adapters" in cfg.train:
        shards.check(model, cfg.adapter, f"{where}.adapter")
    if "last_blocks" in cfg.train and cfg.last_blocks > len(decoder_layers(model)):
        raise UsageError(f"{where}.last_blocks: {cfg.last_blocks} exceeds the model's "
                         f"{len(decoder_layers(model))} blocks")


def check_last(ctx: StageContext) -> None:
    # the pipeline refuses this before the model loads (Method.check_recipe); a caller of fit() directly is not
    methods = [m for m, _ in ctx.recipe.stage_items()]
    last_stage(ctx.index, methods, f"recipe: stages.{ctx.index}.heal")


def trained_weights(model, cfg: HealConfig) -> list[str]:
    """Base parameter names of the norms, head and last blocks the recipe trains (tied tensors once)."""
    names = []
    ids = {}
    layers = decoder_layers(model)
    want = set(cfg.train)
    last = {id(p) for blk in layers[len(layers) - cfg.last_blocks :] for p in blk.parameters()} \
        if "last_blocks" in want else set()
    head = {id(p) for p in model.get_output_embeddings().parameters()} if "head" in want else set()
    norms = set()
    if "norms" in want:
        for mod in model.modules():
            if "norm" in type(mod).__name__.lower():
                norms |= {id(p) for p in mod.parameters(recurse=False)}
    for n, p in model.named_parameters():
        if "adaflex" in n or id(p) in ids:
            continue
        if id(p) in last | head | norms:
            ids[id(p)] = n
            names.append(n)
    return names


def pruned(linear) -> bool:
    w = linear.weight
    return (w.numel() - int(torch.count_nonzero(w))) >= PRUNED * w.numel()


def make_plan(ctx: StageContext, cfg: HealConfig, runs: list[dict] | None, where: str) -> HealPlan:
    model = ctx.model
    plan: dict = {"train": list(cfg.train), "params": trained_weights(model, cfg), "adapter": None,
                  "unmerged": [], "replacements": [], "replacement_rank": cfg.replacement_rank,
                  "hidden_size": model.config.hidden_size, "num_layers": len(decoder_layers(model))}
    if "adapters" in cfg.train:
        if adapted(model):
            raise UsageError(f"{where}.train: adapters: the model already carries adapters of an earlier stage "
                             "(shards); heal norms, head, last_blocks or replacements instead")
        plan["adapter"] = shards.make_plan(model, cfg.adapter, f"{where}.adapter").dump()
        sites = shards.named_targets(model, plan["adapter"]["targets"])  # linears and 3-D experts parameters
        plan["unmerged"] = sorted(n for n, m in sites if pruned(m))
    if "replacements" in cfg.train:
        plan["replacements"] = runs or []
    return HealPlan.model_validate(plan)


def fingerprint(plan: HealPlan, cfg: HealConfig, seed: int, windows: torch.Tensor, model) -> str:
    h = hashlib.sha256(json.dumps([plan.dump(), cfg.model_dump(mode="json"), seed], sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    for n in plan.params:  # the starting weights (what the earlier stages left)
        h.update(model.get_parameter(n).detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def fit(ctx: StageContext, cfg: HealConfig) -> StageResult:
    where = f"recipe: stages.{ctx.index}.heal"
    check_last(ctx)
    check(ctx.model, cfg, where)
    model = ctx.model
    windows = windows_for(ctx.calibration, cfg.seq_len)
    steps = steps_for(cfg, windows.shape[1])
    need_dense = cfg.loss == "kl" or "replacements" in cfg.train
    dense = shards.reload_dense(ctx, f"{where}.teacher", _log, hint="") if need_dense else None
    runs = None
    if "replacements" in cfg.train:
        runs = rp.removed_runs(model, dense)
        if runs is None:
            raise UsageError(f"{where}.train: replacements: cannot tell which dense blocks were removed (a kept "
                             "block matches no dense block); leave replacements out")
        if not runs:
            _log("heal: no removed blocks: no replacement to train")
    plan = make_plan(ctx, cfg, runs, where)
    if not (plan.params or plan.adapter or plan.replacements):
        raise UsageError(f"{where}.train: {cfg.train} selects nothing to train on this model")
    fp = fingerprint(plan, cfg, ctx.seed, windows, model)
    groups: dict[str, dict] = {"fast": {}, "slow": {n: model.get_parameter(n) for n in plan.params}}
    teacher = TopKTeacher(dense, cfg.top_k, cfg.temperature) if cfg.loss == "kl" else None
    state_dir = Path(ctx.state_dir) if ctx.state_dir is not None else None
    metrics: dict = {"train": list(cfg.train), "trained_weights": sum(p.numel() for p in groups["slow"].values()),
                     "replacements": len(plan.replacements), "unmerged_adapters": len(plan.unmerged)}
    g = torch.Generator().manual_seed(ctx.seed)
    try:
        if plan.adapter:
            shards.install(model, plan.adapter, shards.init_tensors(plan.adapter, ctx.seed))
            groups["fast"].update({n: p for n, p in model.named_parameters() if "adaflex" in n
                                   and any(k in n for k in ("adaflex_shards", "adaflex_delta", "adaflex_experts"))})
        for j, rep in enumerate(rp.attach(model, plan.replacements, cfg.replacement_rank)):
            rep.reset(g)
            groups["fast"].update({f"replace.{j}.a": rep.adaflex_a, f"replace.{j}.b": rep.adaflex_b})
        metrics["trainable_params"] = sum(p.numel() for grp in groups.values() for p in grp.values())
        if teacher is not None and world()[0] == 0:
            metrics["kl_before"] = mean_kl(model, windows[: cfg.batch_size], teacher, cfg)
        metrics.update(heal(model, windows, groups, cfg, teacher, steps=steps, seed=ctx.seed, state_dir=state_dir,
                            fingerprint=fp, log=_log))
        if teacher is not None and world()[0] == 0:
            metrics["kl_after"] = mean_kl(model, windows[: cfg.batch_size], teacher, cfg)
        tensors = collect(model, plan)
    finally:
        rp.detach_all(model)
        remove_all(model)
    return StageResult(plan=plan, tensors=tensors, metrics=metrics)


@torch.no_grad()
def collect(model, plan: HealPlan) -> dict[str, torch.Tensor]:
    out = {f"weight.{n}": model.get_parameter(n).detach().cpu().clone() for n in plan.params}
    if plan.adapter:
        out.update({f"adapter.{k}": v for k, v in shards.collect(model, plan.adapter).items()})
    for j, run in enumerate(plan.replacements):
        blk = decoder_layers(model)[max(run.after, 0)]
        rep = blk.adaflex_heal_after if run.after >= 0 else blk.adaflex_heal_before
        out[f"replace.{j}.a"] = rep.adaflex_a.detach().cpu().clone()
        out[f"replace.{j}.b"] = rep.adaflex_b.detach().cpu().clone()
    return out


@torch.no_grad()
def apply(model, plan: HealPlan, tensors: dict | None = None) -> None:
    """Restore the healed model from plan + tensors (deterministic)."""
    tensors = tensors or {}
    plan.check_model(model)
    plan.check_tensors(tensors)
    baked = plan.weights_baked
    if not baked:
        for p in plan.params:
            model.get_parameter(p).copy_(tensors[f"weight.{p}"])
    if plan.adapter:
        shards.install(model, plan.adapter, adapter_tensors(tensors))
        keep = set(plan.unmerged)
        for name, m in adapted(model):
            if name in keep:
                continue
            if not baked:
                merge(m)
            detach(m)
        if not keep:
            remove_all(model)
    rp.detach_all(model)
    for j, rep in enumerate(rp.attach(model, plan.replacements, plan.replacement_rank)):
        rep.adaflex_a.copy_(tensors[f"replace.{j}.a"])
        rep.adaflex_b.copy_(tensors[f"replace.{j}.b"])
    for name, p in model.named_parameters():
        if "adaflex" in name:
            p.requires_grad_(False)


def export_extra(model, plan: HealPlan, tensors: dict, out_dir: Path, merge: bool) -> dict:
    """The export holds the trained weights with the mergeable adapters merged (whatever `merge` says: the
    cost reported counts them merged); load then installs only the unmerged adapters and the replacements."""
    if not plan.unmerged and not plan.replacements:
        return {"baked": True}
    return {"baked": False, "plan": {**plan.dump(), "weights_baked": True}}
