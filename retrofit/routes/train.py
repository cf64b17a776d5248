"""Router training: teacher forcing, focal loss (gamma 2) with effective-number class weights, AdamW,
linear warm-up then cosine decay.

Teacher forcing: each example's prompt runs along its *label* path; the state entering block b (after
the label's decisions on blocks < b) is pooled into windows and is router b's input. The base model is
frozen, so the pooled features are computed once and the routers train on them alone.
"""

from __future__ import annotations

import math

import torch

from .router import EXECUTE, Routers, pool, window_weights


@torch.no_grad()
def teacher_features(runner, prompts: list[torch.Tensor], paths: list[tuple], windows: int):
    """Pooled states [N, L, W, d] and window masks [N, W] along each example's label path."""
    L = len(runner.blocks)
    feats, masks = [], []
    for ids, path in zip(prompts, paths, strict=True):
        h, kw = runner.inputs(ids)
        weights, wmask = window_weights(torch.ones(ids.shape, dtype=torch.bool), windows)
        per_block = []
        for b in range(L):
            per_block.append(pool(h, weights)[0].float())
            for _ in range(sum(1 for x in path if x == b)):
                h = runner.block(b, h, kw)
        feats.append(torch.stack(per_block))
        masks.append(wmask[0])
    return torch.stack(feats), torch.stack(masks)


def class_weights(labels: torch.Tensor, beta: float = 0.999) -> torch.Tensor:
    """Effective-number weights per block and class [L, 3]: (1 - beta) / (1 - beta^n_c), normalised to
    mean 1 over the classes present; absent classes get weight 0."""
    L = labels.shape[1]
    out = torch.zeros(L, 3)
    for b in range(L):
        n = torch.bincount(labels[:, b], minlength=3).double()
        w = torch.where(n > 0, (1 - beta) / (1 - torch.pow(beta, n)), torch.zeros_like(n))
        present = (n > 0).sum()
        out[b] = (w / w.sum() * present).float()
    return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(1, target[:, None])[:, 0]
    w = weight[target]
    return -(w * (1 - lp.exp()) ** gamma * lp).sum() / w.sum().clamp_min(1e-9)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up over `warmup` steps, then cosine to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def train_routers(feats: torch.Tensor, wmask: torch.Tensor, labels: torch.Tensor, cfg,
                  seed: int = 0) -> tuple[Routers, dict]:
    """feats [N, L, W, d], wmask [N, W], labels [N, L] in {0, 1, 2} -> trained routers and figures."""
    N, L, _, d = feats.shape
    torch.manual_seed(seed)
    routers = Routers(L, d, cfg.bottleneck)
    # only the classes some label chose for a block (execute always): see Routers.allowed
    routers.allowed.copy_(torch.stack([torch.bincount(labels[:, b], minlength=3) > 0 for b in range(L)]))
    routers.allowed[:, EXECUTE] = True
    weights = class_weights(labels, cfg.beta)
    opt = torch.optim.AdamW(routers.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(N / cfg.batch_size)
    # a few labelled examples in few epochs leave the routers at their initial, nearly flat logits, and the
    # dial alone then decides every block: train on the cached features for at least `min_steps` steps
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    total = steps_per_epoch * epochs
    warmup = min(cfg.warmup, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warmup))
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add synchronisation (and suffer on a busy machine)
    try:
        _fit(routers, feats, wmask, labels, weights, opt, sched, gen, cfg, epochs)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        last = sum(focal_loss(routers.logits(b, feats[:, b], wmask), labels[:, b], weights[b], cfg.gamma).item()
                   for b in range(L)) / L
    with torch.no_grad():
        pred = torch.stack([routers.logits(b, feats[:, b], wmask).argmax(-1) for b in range(L)], 1)
    acc = (pred == labels).float().mean().item()
    skip_recall = ((pred == 0) & (labels == 0)).sum().item() / max(1, (labels == 0).sum().item())
    return routers.eval(), {"train_loss": last, "train_acc": acc, "train_skip_recall": skip_recall, "steps": total,
                            "epochs": epochs, "warmup": warmup}


def _fit(routers, feats, wmask, labels, weights, opt, sched, gen, cfg, epochs: int) -> None:
    N, L = labels.shape
    with torch.enable_grad():
        for _epoch in range(epochs):
            order = torch.randperm(N, generator=gen)
            for s in range(0, N, cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                loss = sum(focal_loss(routers.logits(b, feats[idx, b], wmask[idx]), labels[idx, b], weights[b],
                                      cfg.gamma) for b in range(L)) / L
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
