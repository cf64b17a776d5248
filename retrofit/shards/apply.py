"""Stage `shards`: check, fit (draw indices, train), apply (re-install from plan + tensors), export.

Tensors of the stage (stored under `stages.{i}.shards.` in adaflex.safetensors):
    mos:  pool.{type}.a [e·L·l, d_in/l], pool.{type}.b [e·L·l, d_out/l]   (each pool once)
          index.{type}.a / index.{type}.b [L, r, l] in the smallest integer dtype
    lora: lora.{type}.a [L, r, d_in], lora.{type}.b [L, d_out, r]
          (a 3-D experts target: lora.{t}.a [L, E, r, d_in], lora.{t}.b [L, E, d_out, r], experts.py)
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from .. import arch, models
from ..arch import decoder_layers
from ..errors import UsageError
from ..stage import StageContext, StageResult
from . import experts as ex
from . import indices as ix
from .config import EXPERT_TARGETS, ShardsConfig, mos_feasibility
from .layer import (
    DTYPES,
    LoraDelta,
    MoSDelta,
    ShardPool,
    adapted,
    attach,
    disabled,
    index_dtype,
    merge_all,
    record,
    remove_all,
)
from .plan import ShardsPlan, trainable_params
from .targets import matches, resolve
from .train import CachedTeacher, heal, windows_for


def dims(m: nn.Module | ex.Site) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear, of GPT-2's Conv1D (arch.linear_dims) or of one expert of a 3-D experts
    parameter."""
    return m.dims() if isinstance(m, ex.Site) else arch.linear_dims(m)


def _paths(block: nn.Module) -> list[str]:
    """The paths of a block's adaptable linears (nn.Linear, GPT-2's Conv1D)."""
    return [n for n, m in block.named_modules() if arch.is_linear(m)]


def _matches(block: nn.Module, target: str) -> list[str]:
    """The block's linears a target names, as peft's `target_modules` does (targets.py); a 3-D experts target: the
    parameters it names, as peft's `target_parameters` does."""
    if target in EXPERT_TARGETS:
        return [n for n, _ in ex.find(block, target)]
    return matches(_paths(block), target)


def _linear(block: nn.Module, target: str) -> nn.Module | ex.Site | None:
    if target in EXPERT_TARGETS:
        found = ex.find(block, target)
        return found[0][1] if len(found) == 1 else None
    found = _matches(block, target)
    return block.get_submodule(found[0]) if len(found) == 1 else None


def targets_of(model, targets: list[str]) -> dict[str, list[nn.Module | ex.Site]]:
    return {t: [_linear(blk, t) for blk in decoder_layers(model)] for t in targets}


def named_targets(model, targets: list[str]) -> list[tuple[str, nn.Module | ex.Site]]:
    """(name in the model, linear or 3-D experts parameter) of every adapter site the targets name."""
    prefix = {id(blk): n for n, blk in model.named_modules() if any(blk is b for b in decoder_layers(model))}
    return [(f"{prefix[id(blk)]}.{n}", site) for blk in decoder_layers(model) for t in targets
            for n, site in (ex.find(blk, t) if t in EXPERT_TARGETS
                            else [(n, blk.get_submodule(n)) for n in _matches(blk, t)])]


def resolve_targets(model, cfg) -> list[str]:
    """The targets as set, or, left unset on a block without Llama's names, every linear role the architecture
    adapter maps for its family (targets.py `resolve`: the search's prediction resolves them the same way)."""
    return resolve(_paths(decoder_layers(model)[0]), arch.role_names(model), cfg.targets,
                   "targets" in cfg.model_fields_set)


def block_shapes(model, targets: list[str], where: str = "shards") -> dict[str, list[tuple[int, int]]]:
    """(d_in, d_out) of each target in every block (width pruning may give each block its own)."""
    out = {}
    for t, mods in targets_of(model, targets).items():
        if any(m is None for m in mods):
            block = decoder_layers(model)[0]
            if t in EXPERT_TARGETS and not arch.layout(model).moe:
                raise arch.refuse(model, f"{where}.targets", f"'{t}' is a 3-D parameter of a mixture-of-experts "
                                  "experts module; this model's blocks have no experts")
            many = _matches(block, t)
            if len(many) > 1:
                raise UsageError(f"{where}.targets: '{t}' names {len(many)} linears of a block ({', '.join(many)}): "
                                 "name one by its path")
            have = sorted({n.rsplit(".", 1)[-1] for n, m in block.named_modules() if arch.is_linear(m)})
            params = [f"experts.{n.rsplit('.', 1)[-1]}" for x in EXPERT_TARGETS for n, _ in ex.find(block, x)]
            also = f"; its 3-D experts parameters: {', '.join(params)} (method: lora)" if params else ""
            raise arch.refuse(model, f"{where}.targets", f"'{t}' is not an nn.Linear of every decoder block "
                              f"(its blocks' linears: {', '.join(have) or 'none'}{also})")
        out[t] = [dims(m) for m in mods]
    return out


def shapes(model, cfg: ShardsConfig, where: str = "shards",
           per_block: dict[str, list[tuple[int, int]]] | None = None) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) per target type. A MoS pool holds one shape per target, so MoS needs it the same in every
    block (else a UsageError); LoRA keeps a pair of factors per block, so for LoRA it is the largest in each
    dimension and `block_shapes` says each block's (`per_block`: those, when the caller has them)."""
    out = {}
    for t, dd in (per_block or block_shapes(model, resolve_targets(model, cfg), where)).items():
        if len(set(dd)) != 1 and cfg.method == "mos":
            raise UsageError(f"{where}.targets: '{t}' has different shapes across blocks {sorted(set(dd))} "
                             "(width pruning): a MoS pool needs one shape per target; use method: lora")
        out[t] = (max(d for d, _ in dd), max(d for _, d in dd))
    return out


def check(model, cfg: ShardsConfig, where: str) -> None:
    """Settings that depend on the model: targets present, l divides every dim, pools large enough."""
    dims = shapes(model, cfg, where)
    if cfg.method != "mos":
        return
    if any(t in EXPERT_TARGETS for t in dims):  # a config built with model_construct() skips the validator
        raise UsageError(f"{where}.method: mos pools cannot hold 3-D experts targets; use method: lora")
    n_sh, n_layers = cfg.shards_per_vector, len(decoder_layers(model))
    for t, (d_in, d_out) in dims.items():
        if d_in % n_sh or d_out % n_sh:
            g = math.gcd(*[d for pair in dims.values() for d in pair])
            raise UsageError(f"{where}.shards_per_vector: {n_sh} does not divide {t}'s dims {d_in}×{d_out} "
                             f"(valid: divisors of {g})")
    why = mos_feasibility(cfg.rank, cfg.equivalent_rank, n_sh, cfg.private_rank, n_layers, cfg.subset_selection)
    if why:
        raise UsageError(f"{where}.rank: {why} ({n_layers} layers; set subset_selection: false to draw with "
                         "replacement, or raise equivalent_rank)")


def make_plan(model, cfg: ShardsConfig, where: str = "shards") -> ShardsPlan:
    check(model, cfg, where)
    per_block = block_shapes(model, resolve_targets(model, cfg), where)
    dims = shapes(model, cfg, where, per_block)
    n = len(decoder_layers(model))
    plan = {"method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha, "scaling": cfg.alpha / cfg.rank,
            "dropout": cfg.dropout, "dtype": cfg.dtype, "targets": list(dims), "num_layers": n,
            "shapes": {t: list(d) for t, d in dims.items()}}
    if any(len(set(d)) > 1 for d in per_block.values()):  # only after per-block widths (LoRA: see shapes)
        plan["block_shapes"] = {t: [list(x) for x in d] for t, d in per_block.items()}
    sites = {t: mods[0] for t, mods in targets_of(model, list(dims)).items() if t in EXPERT_TARGETS}
    if sites:  # [experts, top_k] of each 3-D experts target
        blk = decoder_layers(model)[0]
        plan["experts"] = {t: [site.num_experts, ex.top_k(blk)] for t, site in sites.items()}
    if cfg.method == "mos":
        pool = ix.pool_size(n, cfg.equivalent_rank, cfg.shards_per_vector)
        plan.update({"equivalent_rank": cfg.equivalent_rank, "shards_per_vector": cfg.shards_per_vector,
                     "private_rank": cfg.private_rank, "pool_shards": pool,
                     "index_dtype": str(index_dtype(pool)).removeprefix("torch."),
                     "subset_selection": cfg.subset_selection, "pair_dissociation": cfg.pair_dissociation,
                     "vector_sharding": cfg.vector_sharding})
    plan["trainable_params"] = trainable_params(plan["method"], plan["rank"], plan.get("equivalent_rank"), n,
                                                plan["shapes"], plan.get("block_shapes"), plan.get("experts"))
    return ShardsPlan.model_validate(plan)


def init_tensors(plan: ShardsPlan, seed: int) -> dict[str, torch.Tensor]:
    """Fresh adapter tensors: A Kaiming-uniform (fan = full d_in), B zero, MoS indices drawn from `seed`."""
    dtype = DTYPES[plan.dtype]
    g = torch.Generator().manual_seed(seed)
    n, r, out = plan.num_layers, plan.rank, {}
    for k, (t, (d_in, d_out)) in enumerate(plan.shapes.items()):
        bound = 1 / math.sqrt(d_in)
        if plan.method == "mos":
            n_sh, pool = plan.shards_per_vector, plan.pool_shards
            out[f"pool.{t}.a"] = (torch.rand(pool, d_in // n_sh, generator=g) * 2 * bound - bound).to(dtype)
            out[f"pool.{t}.b"] = torch.zeros(pool, d_out // n_sh, dtype=dtype)
            a, b = ix.draw(n, r, plan.equivalent_rank, n_sh, plan.private_rank, subset=plan.subset_selection,
                           dissociate=plan.pair_dissociation, shard=plan.vector_sharding,
                           seed=seed * 7 + k)
            idt = index_dtype(pool)
            out[f"index.{t}.a"], out[f"index.{t}.b"] = a.to(idt), b.to(idt)
        elif t in (plan.experts or {}):  # one LoRA per expert, each with LoRA's init
            e = plan.experts[t][0]
            out[f"lora.{t}.a"] = (torch.rand(n, e, r, d_in, generator=g) * 2 * bound - bound).to(dtype)
            out[f"lora.{t}.b"] = torch.zeros(n, e, d_out, r, dtype=dtype)
        elif plan.block_shapes:  # per-block shapes, zero-padded to the largest (each block's own fan-in)
            a = torch.zeros(n, r, d_in, dtype=dtype)
            for i, (di, _) in enumerate(plan.block_shapes[t]):
                a[i, :, :di] = torch.rand(r, di, generator=g) * 2 / math.sqrt(di) - 1 / math.sqrt(di)
            out[f"lora.{t}.a"], out[f"lora.{t}.b"] = a, torch.zeros(n, d_out, r, dtype=dtype)
        else:
            out[f"lora.{t}.a"] = (torch.rand(n, r, d_in, generator=g) * 2 * bound - bound).to(dtype)
            out[f"lora.{t}.b"] = torch.zeros(n, d_out, r, dtype=dtype)
    return out


def pool_key(target: str) -> str:
    return target.replace(".", "__")  # a ModuleDict key has no dots (GPT-2's `attn.c_proj`)


def install(model, plan: ShardsPlan, tensors: dict[str, torch.Tensor]) -> None:
    """Put the adapters of `plan` on the model, with their values from `tensors` (copied)."""
    plan.check_model(model)
    plan.check_tensors(tensors)
    remove_all(model)
    dtype = DTYPES[plan.dtype]
    ref = next(model.parameters())
    dev = ref.device
    pools = nn.ModuleDict()
    scale, drop = plan.scaling, plan.dropout
    for t, mods in targets_of(model, plan.targets).items():
        d_in, d_out = plan.shapes[t]
        want = plan.block_shapes[t] if plan.block_shapes else [[d_in, d_out]] * len(mods)
        for i, (m, w) in enumerate(zip(mods, want, strict=True)):
            if m is None or list(dims(m)) != list(w):
                got = "no such linear" if m is None else "×".join(map(str, dims(m)))
                raise UsageError(f"shards: block {i}'s {t} is {got}, the plan's adapter is for {w[0]}×{w[1]}")
        if plan.method == "mos":
            pool = ShardPool(plan.pool_shards, d_in, d_out, plan.shards_per_vector, dtype).to(dev)
            with torch.no_grad():
                pool.pool_a.copy_(tensors[f"pool.{t}.a"])
                pool.pool_b.copy_(tensors[f"pool.{t}.b"])
            pools[pool_key(t)] = pool
            ia, ib = tensors[f"index.{t}.a"].long().to(dev), tensors[f"index.{t}.b"].long().to(dev)
            for i, m in enumerate(mods):
                attach(m, MoSDelta(pool, ia[i], ib[i], scale, drop))
        elif t in (plan.experts or {}):
            a, b = tensors[f"lora.{t}.a"], tensors[f"lora.{t}.b"]
            for i, m in enumerate(mods):
                if m.num_experts != a.shape[1]:
                    raise UsageError(f"shards: block {i}'s {t} holds {m.num_experts} experts, the plan's adapter "
                                     f"{a.shape[1]}")
                attach(m, ex.ExpertsDelta(a[i].to(dev, dtype), b[i].to(dev, dtype), scale, m.transposed))
        else:
            a, b = tensors[f"lora.{t}.a"], tensors[f"lora.{t}.b"]
            for i, m in enumerate(mods):  # a narrowed block takes the leading slice of the padded factors
                d_i, d_o = dims(m)
                a_i, b_i = a[i, :, :d_i], b[i, :d_o]
                attach(m, LoraDelta(a_i.to(dev, dtype), b_i.to(dev, dtype), scale, drop))
    if len(pools):
        model.adaflex_shards = pools
    record(model)


@torch.no_grad()
def collect(model, plan: ShardsPlan) -> dict[str, torch.Tensor]:
    """The stage's tensors from the installed adapters: pools once, indices in their small dtype."""
    out = {}
    for t, mods in targets_of(model, plan.targets).items():
        deltas = [m.adaflex_delta for m in mods]
        if plan.method == "mos":
            pool = model.adaflex_shards[pool_key(t)]
            out[f"pool.{t}.a"] = pool.pool_a.detach().cpu().clone()
            out[f"pool.{t}.b"] = pool.pool_b.detach().cpu().clone()
            idt = getattr(torch, plan.index_dtype)
            out[f"index.{t}.a"] = torch.stack([d.idx_a for d in deltas]).cpu().to(idt)
            out[f"index.{t}.b"] = torch.stack([d.idx_b for d in deltas]).cpu().to(idt)
        elif t in (plan.experts or {}):
            out[f"lora.{t}.a"] = torch.stack([d.adaflex_a.detach().cpu() for d in deltas])
            out[f"lora.{t}.b"] = torch.stack([d.adaflex_b.detach().cpu() for d in deltas])
        else:
            d_in, d_out = plan.shapes[t]
            a = torch.zeros(len(deltas), plan.rank, d_in, dtype=deltas[0].adaflex_a.dtype)
            b = torch.zeros(len(deltas), d_out, plan.rank, dtype=deltas[0].adaflex_b.dtype)
            for i, d in enumerate(deltas):  # zero-padded back to the largest shape (per-block widths)
                a[i, :, : d.adaflex_a.shape[1]] = d.adaflex_a.detach().cpu()
                b[i, : d.adaflex_b.shape[0]] = d.adaflex_b.detach().cpu()
            out[f"lora.{t}.a"], out[f"lora.{t}.b"] = a, b
    return out


def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A [r, d_in], B [d_out, r]) of every installed adapter: the exact rank-r LoRA (a 3-D experts
    parameter's name -> A [E, r, d_in], B [E, d_out, r])."""
    out = {}
    with torch.no_grad():
        for name, m in adapted(model):
            a, b = m.adaflex_delta.factors()
            out[name] = (a.detach().clone(), b.detach().clone())
    return out


# ---- teacher ----


def reload_dense(ctx: StageContext, where: str, log, hint: str = "; set teacher: input to distil from this "
                 "stage's input model"):
    """The dense model before any stage, reloaded from its source, frozen on the model's device (the `dense`
    teacher of `shards` and of `heal`)."""
    model = ctx.model
    source = getattr(model, "name_or_path", None) or ""
    try:
        if source and Path(source).is_dir() and (Path(source) / "config.json").is_file():
            teacher, _ = models.load_hf(source, dtype=next(model.parameters()).dtype)
        elif ctx.recipe.model:
            teacher, _ = models.load_base(ctx.recipe.model, dtype=next(model.parameters()).dtype)
            source = ctx.recipe.model
        else:
            raise UsageError("no model source known")
    except UsageError as e:
        raise UsageError(f"{where}: cannot reload the dense model ({e}){hint}") from None
    teacher.to(next(model.parameters()).device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    log(f"teacher is the dense model reloaded from {source}")
    return teacher


def _teacher(ctx: StageContext, cfg: ShardsConfig, log):
    model = ctx.model
    if cfg.loss == "lm":
        return None
    if cfg.teacher == "input":
        def fn(_which, ids):
            with disabled(model):
                return model(input_ids=ids, use_cache=False).logits
        return CachedTeacher(fn)
    teacher = reload_dense(ctx, f"recipe: stages.{ctx.index}.shards.teacher", log)

    def fn(_which, ids):
        return teacher(input_ids=ids, use_cache=False).logits
    return CachedTeacher(fn)


def fingerprint(plan: ShardsPlan, cfg: ShardsConfig, seed: int, windows: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps([plan.dump(), cfg.model_dump(mode="json"), seed], sort_keys=True).encode())
    h.update(windows.numpy().tobytes())
    return h.hexdigest()


def fit(ctx: StageContext, cfg: ShardsConfig) -> StageResult:
    import sys

    where = f"recipe: stages.{ctx.index}.shards"

    def log(msg: str) -> None:
        print(f"adaflex: {msg}", file=sys.stderr)

    plan = make_plan(ctx.model, cfg, where)
    if arch.layout(ctx.model).moe and not plan.experts:
        log("shards: the 3-D experts get no adapter (name `experts` in targets, method lora, to adapt them)")
    tensors = init_tensors(plan, ctx.seed)
    metrics: dict = {"adapter": cfg.method, "trainable_params": plan.trainable_params}
    if cfg.steps:
        cal = ctx.calibration
        if cfg.holdout >= cal.shape[0]:
            raise UsageError(f"{where}.holdout: {cfg.holdout} of {cal.shape[0]} calibration windows leaves none "
                             "to train on")
        train_w = windows_for(cal[: cal.shape[0] - cfg.holdout], cfg.seq_len)
        hold_w = windows_for(cal[cal.shape[0] - cfg.holdout :], cfg.seq_len) if cfg.holdout else None
        state_dir = Path(ctx.state_dir) if ctx.state_dir is not None else None
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)
        install(ctx.model, plan, tensors)
        try:
            teacher = _teacher(ctx, cfg, log)
            metrics.update(heal(ctx.model, train_w, cfg, teacher, seed=ctx.seed, state_dir=state_dir,
                                fingerprint=fingerprint(plan, cfg, ctx.seed, train_w), holdout=hold_w, log=log))
            tensors = collect(ctx.model, plan)
        finally:
            remove_all(ctx.model)
    metrics["adapter_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    return StageResult(plan=plan, tensors=tensors, metrics=metrics)


def apply(model, plan: ShardsPlan, tensors: dict | None = None) -> None:
    """Install the trained adapters (deterministic: plan + tensors only)."""
    install(model, plan, tensors or {})
    for name, p in model.named_parameters():
        if "adaflex" in name:
            p.requires_grad_(False)


# ---- export ----


def export_extra(model, plan: ShardsPlan, tensors: dict, out_dir: Path, merge: bool) -> dict:
    """Called by `adaflex export` with the restored model. Merged: ΔW goes into the base weights (the
    stage is then baked: load does not re-install it). Otherwise write `out_dir/lora/`, the exact rank-r
    peft LoRA of the adapters (ΔW = B·A·alpha/r, the same as the MoS one)."""
    if merge:
        merge_all(model)
        return {"baked": True}
    if plan.block_shapes:
        # the export holds per-block widths zero-padded to the dense shapes (width/README.md): a peft adapter for it
        # would need the same padding, which peft's loader does not know about
        raise UsageError("export: the shards adapters have per-block shapes (after per-block widths); peft LoRA "
                         "needs one shape per target: export with --merge-adapters")
    write_peft_lora(model, plan, Path(out_dir) / "lora")
    return {"baked": False, "peft_lora": "lora"}


def write_peft_lora(model, plan: ShardsPlan, out: Path) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    linears = [t for t in plan.targets if t not in EXPERT_TARGETS]
    params = [t for t in plan.targets if t in EXPERT_TARGETS]
    conv = {isinstance(m, nn.Linear) for _, m in adapted(model) if not isinstance(m, ex.Site)} == {False}  # Conv1D
    # peft's ParamWrapper refuses a nonzero lora_dropout (it cannot be factored out of a weight delta); dropout is
    # a training setting, so the inference the export is for is the same
    cfg = LoraConfig(r=plan.rank, lora_alpha=plan.alpha, lora_dropout=0.0 if params else plan.dropout, bias="none",
                     target_modules=linears or None, target_parameters=params or None, task_type="CAUSAL_LM",
                     fan_in_fan_out=conv)
    cfg.save_pretrained(str(out))
    weights = {}
    factors = lora_factors(model)
    nest = ex.nestings([n for n, (a, _) in factors.items() if a.dim() == 3], model)
    for name, (a, b) in factors.items():
        if name in nest:  # a 3-D experts parameter (peft's target_parameters)
            weights.update(ex.peft_tensors(name, a, b, nest[name]))
            continue
        weights[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        weights[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
