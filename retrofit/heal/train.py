"""The heal loop: KL to the dense model's top-k logits, pruning masks enforced, resumable, data-parallel.

- Teacher: per window, the dense model's top-k log-probabilities and their token ids (k·T values, not
  V·T), computed when a window is first used. The KL is taken over the k tokens plus one tail bin holding
  the rest of the mass: exact for the coarsened distribution, a lower bound of the full KL.
- Masks: a trained weight holding exact zeros (pruned) keeps them: its gradient is masked and the mask is
  re-applied after each optimizer step (AdamW's decoupled decay alone would keep zeros, clipping too; the
  re-application makes it hold whatever the optimizer).
- Data parallel (torch.distributed): under torchrun (WORLD_SIZE > 1) each rank takes its slice of every
  global batch and the gradients are averaged by one all-reduce, so the update equals the one-process
  update over the same global batch; gloo on CPU, NCCL on GPU. Only rank 0 writes checkpoints.
- Resume: seeded batches and the same step order (the shards loop's `batch_ids`), an atomic checkpoint of
  the trained tensors and the optimizer under the stage's state folder.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import UsageError
from ..progress import progress
from ..shards.train import batch_ids, lm_loss, load_checkpoint, mean_loss, save_checkpoint
from .config import HealConfig

# ---- data parallel ----


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; joins the process group on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _average_grads(params: list[torch.Tensor], size: int) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    off = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(p).clone()
        off += n


# ---- teacher and loss ----


class TopKTeacher:
    """The dense model's top-k log-probabilities per window, memoised (bounded: k per token)."""

    def __init__(self, teacher, k: int, temperature: float):
        self.teacher, self.k, self.t = teacher, k, temperature
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, which: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = which.tolist()
        todo = [i for i, k in enumerate(keys) if k not in self.store]
        if todo:
            logits = self.teacher(input_ids=ids[todo], use_cache=False).logits.float()
            vals, idx = F.log_softmax(logits / self.t, dim=-1).topk(self.k, dim=-1)
            for i, v, x in zip(todo, vals, idx, strict=True):
                self.store[keys[i]] = (v.clone(), x.to(torch.int32))
        return (torch.stack([self.store[k][0] for k in keys]), torch.stack([self.store[k][1] for k in keys]))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, clamped away from log 0."""
    return torch.log1p(-x.exp().clamp(max=1 - 1e-6))


def topk_kl(student: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) over the teacher's top-k tokens plus one tail bin, × T²."""
    logp = F.log_softmax(student.float() / temperature, dim=-1)
    s = logp.gather(-1, t_idx.long())
    p = t_logp.exp()
    t_tail, s_tail = _log1mexp(torch.logsumexp(t_logp, -1)), _log1mexp(torch.logsumexp(s, -1))
    kl = (p * (t_logp - s)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    return kl.mean() * temperature**2


def loss_on(model, ids: torch.Tensor, which: torch.Tensor, teacher: TopKTeacher | None, cfg: HealConfig):
    ids = ids.to(model.device)  # calibration windows live on the CPU
    logits = model(input_ids=ids, use_cache=False).logits
    if cfg.loss == "lm":
        return lm_loss(logits, ids)
    t_logp, t_idx = teacher(which, ids)
    return topk_kl(logits, t_logp, t_idx, cfg.temperature)


def mean_kl(model, windows: torch.Tensor, teacher: TopKTeacher, cfg: HealConfig) -> float:
    """Top-k KL of the model as it is (eval mode) over `windows` (teacher ids 0..n-1)."""
    return mean_loss(model, windows, torch.arange(windows.shape[0], device=windows.device), teacher, cfg, loss=loss_on)


# ---- the loop ----


def steps_for(cfg: HealConfig, seq_len: int) -> int:
    return max(1, math.ceil(cfg.tokens / (cfg.batch_size * seq_len)))


def lr_scale(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% (the shards loop's schedule, as a factor)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def masks_of(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep-masks of the trained matrices that hold exact zeros (pruned weights)."""
    out = {}
    for n, p in params.items():
        if p.dim() == 2:
            keep = p.detach() != 0
            if not bool(keep.all()):
                out[n] = keep
    return out


def heal(model, windows: torch.Tensor, groups: dict[str, dict[str, torch.Tensor]], cfg: HealConfig,
         teacher: TopKTeacher | None, *, steps: int, seed: int = 0, state_dir: Path | None = None,
         fingerprint: str = "", log=None) -> dict:
    """Train `groups` ({"fast": {name: param}, "slow": {...}}: lr and weights_lr) in place; returns figures.
    Resumes from `state_dir/checkpoint.pt` when its fingerprint matches."""
    log = log or (lambda msg: None)
    rank, size = world()
    if cfg.batch_size % size:
        raise UsageError(f"heal.batch_size: {cfg.batch_size} does not split over {size} ranks")
    params = {n: p for g in groups.values() for n, p in g.items()}
    if not params:
        raise RuntimeError("heal: nothing to train")
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    masks = masks_of(params)
    hooks = [params[n].register_hook(lambda g, m=m: g * m) for n, m in masks.items()]
    lrs = {"fast": cfg.lr, "slow": cfg.weights_lr}
    opt = torch.optim.AdamW([{"params": list(g.values()), "lr": lrs[k], "base": lrs[k]}
                             for k, g in groups.items() if g], weight_decay=cfg.weight_decay)
    ckpt = Path(state_dir) / "checkpoint.pt" if state_dir is not None else None
    start, history = load_checkpoint(ckpt, fingerprint, params, opt)
    if start:
        log(f"heal: resumed at step {start} of {steps} from {ckpt}")

    def save(step: int) -> None:
        if ckpt is not None and rank == 0:
            save_checkpoint(ckpt, fingerprint, step, history, params, opt)
        if size > 1:
            dist.barrier()

    ids_all = torch.arange(windows.shape[0], device=windows.device)
    was_training = model.training
    model.train()
    tokens, seconds = 0, 0.0
    plist = list(params.values())
    try:
        for step in progress(range(start, steps), desc="heal", total=steps - start, disable=rank != 0):
            t0 = time.perf_counter()
            which = batch_ids(step, windows.shape[0], cfg.batch_size, seed)[rank::size]
            torch.manual_seed(seed * 1_000_003 + step * size + rank)
            for group in opt.param_groups:
                group["lr"] = group["base"] * lr_scale(step, steps, cfg.warmup)
            loss = loss_on(model, windows[which], ids_all[which], teacher, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if size > 1:
                _average_grads(plist, size)
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= size
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(plist, cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].mul_(m)
            history.append(loss.item())
            seconds += time.perf_counter() - t0
            tokens += windows[which].numel() * size
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                save(step + 1)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    k = max(1, min(5, len(history) // 4))
    return {"steps": steps, "resumed_at": start, "ranks": size, "masked_matrices": len(masks),
            "train_loss_first": sum(history[:k]) / k if history else None,
            "train_loss_last": sum(history[-k:]) / k if history else None,
            "train_tokens": tokens, "train_tokens_per_s": tokens / seconds if seconds else None}
