"""ShortGPT block influence and static block removal."""

from __future__ import annotations

import torch

from ..arch import attention, decoder_layers, reference_of, set_decoder_layers
from ..errors import UsageError
from ..progress import progress
from ..stage import StageContext, StageResult
from .config import DropConfig
from .plan import DropPlan


@torch.no_grad()
def block_influence(model, windows: torch.Tensor, batch_size: int = 4, show_progress: bool = True) -> list[float]:
    """BI_i = 1 − mean over tokens of cos(input of block i, output of block i)."""
    layers = decoder_layers(model)
    device = model.device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)  # on the model's device: no sync per block
    tokens = 0
    seen: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            seen[i] = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum().double()

        return fn

    hooks = [blk.register_forward_hook(hook(i), with_kwargs=True) for i, blk in enumerate(layers)]
    try:
        for s in progress(range(0, windows.shape[0], batch_size), desc="block influence",
                          total=-(-windows.shape[0] // batch_size), disable=not show_progress):
            x = windows[s : s + batch_size].to(device)
            model.get_decoder()(input_ids=x, use_cache=False)
            for i, v in seen.items():
                sums[i] += v
            tokens += x.numel()
    finally:
        for h in hooks:
            h.remove()
    return (1 - sums / tokens).tolist()


def choose(influence: list[float], k: int, protect: list[int]) -> list[int]:
    """The k blocks of lowest influence, never a protected one."""
    order = sorted((i for i in range(len(influence)) if i not in protect), key=lambda i: influence[i])
    if len(order) < k:
        raise ValueError(f"only {len(order)} blocks may be removed, {k} asked")
    return sorted(order[:k])


def check(model, cfg: DropConfig, where: str) -> None:
    """Settings that depend on the model: the number of blocks to remove and the protected indices."""
    n = len(decoder_layers(model))
    try:
        k = cfg.count(n)
        bad = [i for i in cfg.protect if not 0 <= i < n]
        if bad:
            raise ValueError(f"protect: block {bad[0]} out of range 0..{n - 1}")
        if n - len(set(cfg.protect)) < k:
            raise ValueError(f"only {n - len(set(cfg.protect))} unprotected blocks, {k} to remove")
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def fit(ctx: StageContext, cfg: DropConfig) -> StageResult:
    layers = decoder_layers(ctx.model)
    check(ctx.model, cfg, f"recipe: stages.{ctx.index}.drop")
    k = cfg.count(len(layers))
    bi = block_influence(ctx.model, ctx.calibration)
    removed = choose(bi, k, cfg.protect)
    plan = {"num_layers": len(layers), "removed": removed, "kept": [i for i in range(len(layers)) if i not in removed],
            "block_influence": bi}
    return StageResult(plan=plan, metrics={"removed": removed})


def apply(model, plan: DropPlan, tensors: dict | None = None) -> None:
    """Remove the planned blocks in place."""
    plan.check_model(model)
    remove_blocks(model, plan.kept)


def remove_blocks(model, keep: list[int]) -> None:
    """Keep only the blocks `keep` (ascending), re-indexing attention so cache slots stay contiguous."""
    reference_of(model)  # pin the dense reference before the shape changes
    layers = decoder_layers(model)
    kept = [layers[i] for i in keep]
    set_decoder_layers(model, torch.nn.ModuleList(kept))
    for new, blk in enumerate(kept):
        attention(model, blk).layer_idx = new
        if hasattr(blk, "layer_idx"):
            blk.layer_idx = new
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(kept)
