"""The healing loop: train only the adapters (parameters named "adaflex") on calibration windows, by
KL to a teacher's logits (or plain next-token loss). Small and memory-aware: one optimizer over the
adapter parameters, optional gradient checkpointing, seeded batches and dropout (so a resumed run
takes the same steps), and an atomic checkpoint in the stage's state folder every few steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import io
from ..progress import progress
from .config import ShardsConfig

Teacher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (window ids [B], tokens [B, T]) -> logits


def windows_for(calibration: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """Split calibration windows [S, T] into training windows of `seq_len` tokens (all tokens kept)."""
    if seq_len is None or seq_len >= calibration.shape[1]:
        return calibration
    n = calibration.shape[1] // seq_len
    return calibration[:, : n * seq_len].reshape(-1, seq_len)


KL_ROWS = 16  # token rows per chunk of the KL: a few vocab-wide fp32 temporaries stay in cache


class _KL(torch.autograd.Function):
    """Σ over tokens of KL(softmax(t/T) ‖ softmax(s/T)), chunk by chunk over token rows. On a CPU the plain
    formula spends about as long as the model's forward on vocab-wide passes through memory; here each chunk
    stays in cache, nothing vocab-wide is saved, and the backward recomputes ∂/∂s = (softmax(s/T) −
    softmax(t/T))/T from the logits autograd keeps anyway."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float):
        s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        total = torch.zeros((), dtype=torch.float64, device=s2.device)
        for i in range(0, s2.shape[0], KL_ROWS):
            ls = F.log_softmax(_scaled(s2[i : i + KL_ROWS], temperature), dim=-1)
            lt = F.log_softmax(_scaled(t2[i : i + KL_ROWS], temperature), dim=-1)
            total += (lt.exp() * (lt - ls)).sum()
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        return total.to(torch.promote_types(student.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        temp = ctx.temperature
        s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        out = torch.empty_like(s2)
        for i in range(0, s2.shape[0], KL_ROWS):
            q = F.softmax(_scaled(s2[i : i + KL_ROWS], temp), dim=-1)
            q -= F.softmax(_scaled(t2[i : i + KL_ROWS], temp), dim=-1)
            out[i : i + KL_ROWS] = q.mul_(grad / temp)
        return out.view_as(student), None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half types in fp32, fp64 kept
    return x / temperature if temperature != 1 else x


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) on the softened distributions, times T² (Hinton). The
    teacher's logits may be in any float dtype (bfloat16 caches are read chunk by chunk, never copied whole)."""
    n = student.numel() // student.shape[-1]
    return _KL.apply(student, teacher.detach(), temperature) * (temperature**2 / n)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def loss_of(model, ids: torch.Tensor, which: torch.Tensor, teacher: Teacher | None, cfg: ShardsConfig):
    ids = ids.to(model.device)  # calibration windows live on the CPU
    logits = model(input_ids=ids, use_cache=False).logits
    if cfg.loss == "lm":
        return lm_loss(logits, ids)
    with torch.no_grad():
        t = teacher(which, ids)
    if t.shape != logits.shape:
        raise RuntimeError(f"teacher logits {tuple(t.shape)} do not match the student's {tuple(logits.shape)}")
    return kl_loss(logits, t, cfg.temperature)


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, ids_of: torch.Tensor, teacher: Teacher | None, cfg: ShardsConfig,
              loss=None) -> float:
    """Loss of the model as it is (eval mode) over `windows`, batch by batch (`loss`: as `loss_of`, the
    default; `heal` passes its own)."""
    loss = loss or loss_of
    was = model.training
    model.eval()
    total = 0.0
    try:
        for s in range(0, windows.shape[0], cfg.batch_size):
            x = windows[s : s + cfg.batch_size]
            total += loss(model, x, ids_of[s : s + cfg.batch_size], teacher, cfg).item() * x.shape[0]
    finally:
        model.train(was)
    return total / max(1, windows.shape[0])


class CachedTeacher:
    """Memoise a teacher's logits per window while they fit in `max_bytes` (every epoch after the first
    then costs no teacher forward). Rows are kept in bfloat16: a 256-token window of a 49k vocabulary is
    25 MB instead of 50, so a typical calibration set fits and the KL reads them chunk by chunk in place."""

    def __init__(self, fn: Teacher, max_bytes: int = 1 << 30, dtype: torch.dtype = torch.bfloat16):
        self.fn, self.max_bytes, self.used, self.dtype = fn, max_bytes, 0, dtype
        self.store: dict[int, torch.Tensor] = {}

    def __call__(self, which: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        keys = which.tolist()
        if all(k in self.store for k in keys):
            return torch.stack([self.store[k] for k in keys])
        out = self.fn(which, ids)
        for k, row in zip(keys, out, strict=True):
            size = row.numel() * torch.finfo(self.dtype).bits // 8
            if k not in self.store and self.used + size <= self.max_bytes:
                self.store[k] = row.detach().to(self.dtype, copy=True)
                self.used += size
        # the first epoch sees what later epochs see: the stored (rounded) rows, not the exact ones
        return torch.stack([self.store[k] for k in keys]) if all(k in self.store for k in keys) else out


def lr_at(step: int, cfg: ShardsConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    span = max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / span)))


def batch_ids(step: int, n: int, size: int, seed: int) -> torch.Tensor:
    """Window ids of a step: epoch k is a seeded permutation, so step s is the same after a resume."""
    per_epoch = max(1, n // size) if n >= size else 1
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(n, generator=gen, device=gen.device)  # a CPU generator draws on the CPU
    return perm[pos * size : pos * size + size]


def load_checkpoint(ckpt: Path | None, fingerprint: str, params: dict, opt, report: dict | None = None
                    ) -> tuple[int, list]:
    """(step, loss history) of the checkpoint at `ckpt`, its tensors and optimizer state loaded in place, when
    it holds the same run (`fingerprint`); (0, []) otherwise. Shared by `shards` and `heal`. `report` receives
    the figures saved with it (those of the steps before a resume survive it)."""
    if ckpt is None or not ckpt.is_file():
        return 0, []
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        return 0, []
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    if report is not None:
        report.update(state.get("report", {}))
    return int(state["step"]), list(state["history"])


def save_checkpoint(ckpt: Path, fingerprint: str, step: int, history: list, params: dict, opt,
                    report: dict | None = None) -> None:
    """Atomically: a killed process leaves the previous checkpoint whole."""
    state = {"fingerprint": fingerprint, "step": step, "history": history,
             "params": {n: p.detach().cpu().clone() for n, p in params.items()}, "optimizer": opt.state_dict(),
             "report": report or {}}
    with io.atomic_path(ckpt) as tmp:
        torch.save(state, tmp)


def heal(model, windows: torch.Tensor, cfg: ShardsConfig, teacher: Teacher | None, *, seed: int = 0,
         state_dir: Path | None = None, fingerprint: str = "", holdout: torch.Tensor | None = None,
         log=None) -> dict:
    """Train the adapters in place; returns the loop's figures. Resumes from `state_dir/checkpoint.pt`
    when one with the same fingerprint is there; interruption keeps the last checkpoint."""
    log = log or (lambda msg: None)
    params = {n: p for n, p in model.named_parameters() if "adaflex" in n}
    if not params:
        raise RuntimeError("no adapter parameters (named 'adaflex') to train")
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = Path(state_dir) / "checkpoint.pt" if state_dir is not None else None
    before: dict = {}  # figures of the steps before a resume (the report survives it)
    start, history = load_checkpoint(ckpt, fingerprint, params, opt, before)
    if start:
        log(f"shards: resumed at step {start} of {cfg.steps} from {ckpt}")
    ids_all = torch.arange(windows.shape[0], device=windows.device)
    hold_ids = (torch.arange(holdout.shape[0], device=holdout.device) + windows.shape[0]
                if holdout is not None else None)
    metrics: dict = {k: v for k, v in before.items() if k == "holdout_loss_before"}
    if holdout is not None and holdout.shape[0] and start == 0:
        metrics["holdout_loss_before"] = mean_loss(model, holdout, hold_ids, teacher, cfg)

    was_training = model.training
    gc = cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable")
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tokens, seconds = before.get("tokens", 0), before.get("seconds", 0.0)

    def save(step: int) -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, fingerprint, step, history, params, opt,
                            {"tokens": tokens, "seconds": seconds, **metrics})

    try:
        for step in progress(range(start, cfg.steps), desc="shards: healing", total=cfg.steps - start):
            t0 = time.perf_counter()
            which = batch_ids(step, windows.shape[0], cfg.batch_size, seed)
            x = windows[which]
            torch.manual_seed(seed * 1_000_003 + step)  # dropout of this step, the same after a resume
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = loss_of(model, x, ids_all[which], teacher, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            history.append(loss.item())
            seconds += time.perf_counter() - t0
            tokens += x.numel()
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save(step + 1)
    finally:
        if gc:
            model.gradient_checkpointing_disable()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    if holdout is not None and holdout.shape[0]:
        metrics["holdout_loss_after"] = mean_loss(model, holdout, hold_ids, teacher, cfg)
    k = max(1, min(5, len(history) // 4))
    metrics.update({
        "loss": cfg.loss, "steps": cfg.steps, "resumed_at": start,
        "train_loss_first": sum(history[:k]) / k if history else None,
        "train_loss_last": sum(history[-k:]) / k if history else None,
        "train_tokens": tokens, "train_tokens_per_s": tokens / seconds if seconds else None,
    })
    return metrics
