"""Per-block routers: a bottleneck MLP over windowed mean-pooled prompt states, 3 classes.

Class 0 skips the block, 1 executes it, 2 executes it twice. The prompt (valid tokens only) is split
into min(windows, T) equal windows; the router runs on each window mean and the logits are averaged.
The dial p in [-1, 1] adds p * DIAL_SCALE nats to the repeat class and removes as much from the skip
class (p < 0 leans towards skipping, p > 0 towards repeating, 0 is the trained router).
"""

from __future__ import annotations

import torch
from torch import nn

SKIP, EXECUTE, REPEAT = 0, 1, 2
DIAL_SCALE = 8.0


def make_mlp(width: int, bottleneck: int) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(width, bottleneck), nn.GELU(), nn.Linear(bottleneck, 3))
    for m in (mlp[0], mlp[2]):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    return mlp


class Routers(nn.Module):
    """One router per block (`blocks[b]`); attached to a decoder as `adaflex_router`.

    `allowed[b, c]`: whether block b's labels ever chose class c. A class no label chose gets no gradient of
    its own, so its logit stays near its initial value and the dial could pick it for any input: it is masked."""

    def __init__(self, num_layers: int, width: int, bottleneck: int = 32, guard_rank: int = 0):
        super().__init__()
        self.num_layers, self.width, self.bottleneck = num_layers, width, bottleneck
        self.blocks = nn.ModuleList(make_mlp(width, bottleneck) for _ in range(num_layers))
        self.register_buffer("allowed", torch.ones(num_layers, 3, dtype=torch.bool))
        # out-of-domain guard (fit_guard): mean and principal directions of the training prompts' pooled
        # state entering the first routed block, and the residual norm beyond which a prompt runs every block
        self.register_buffer("guard_mean", torch.zeros(width))
        self.register_buffer("guard_basis", torch.zeros(guard_rank, width))
        self.register_buffer("guard_threshold", torch.tensor(float("inf")))

    def first_routed(self) -> int | None:
        """The first block with a choice (every block before it always executes)."""
        choice = (self.allowed.sum(1) > 1).nonzero()
        return int(choice[0]) if len(choice) else None

    @property
    def guarded(self) -> bool:
        return bool(torch.isfinite(self.guard_threshold)) and self.first_routed() is not None

    def set_guard(self, mean: torch.Tensor, basis: torch.Tensor, threshold: float) -> None:
        self.guard_mean.copy_(mean)
        self.guard_basis = basis.to(self.guard_mean)
        self.guard_threshold.fill_(threshold)

    @torch.no_grad()
    def outside(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, d]: the prompt's mean state entering `first_routed()` -> bool [B], True out of domain."""
        return guard_residual(pooled, self.guard_mean, self.guard_basis) > self.guard_threshold

    def logits(self, b: int, pooled: torch.Tensor, wmask: torch.Tensor) -> torch.Tensor:
        """pooled [B, W, d], wmask [B, W] (1 for real windows) -> logits [B, 3] averaged over windows,
        -inf for the classes block b may not choose."""
        out = self.blocks[b](pooled.to(self.blocks[b][0].weight.dtype)).float()
        w = wmask.float()
        mean = (out * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        return mean.masked_fill(~self.allowed[b].to(mean.device), float("-inf"))

    @torch.no_grad()
    def choose(self, b: int, pooled: torch.Tensor, wnorm: torch.Tensor, dial: float = 0.0) -> torch.Tensor:
        """`decide(logits(b, pooled, wmask), dial)` in six small ops (prefill runs it once per block, where the
        per-op overhead of ~15 ops cost more than skipping a block saves on short prompts): the second
        linear commutes with the window mean, and the output bias, the dial's shift and the class mask fold
        into one vector (a log-softmax shifts every class of a row alike, so the argmax needs none).
        wnorm [B, 1, W]: window mask over its row sum."""
        mlp = self.blocks[b]
        w1 = mlp[0]
        g = torch.nn.functional.gelu(torch.nn.functional.linear(pooled.to(w1.weight.dtype), w1.weight, w1.bias))
        mean = torch.bmm(wnorm.to(g.dtype), g)[:, 0]  # [B, k]
        return torch.addmm(self._folded(b, dial), mean, mlp[2].weight.t()).argmax(-1)

    def _folded(self, b: int, dial: float) -> torch.Tensor:
        cache = self.__dict__.setdefault("_bias_cache", {})
        bias = self.blocks[b][2].bias
        key = (b, float(dial), bias.data_ptr(), bias._version, self.allowed.data_ptr(), self.allowed._version)
        if key not in cache:
            if len(cache) > 4 * self.num_layers:
                cache.clear()
            shift = torch.tensor([-dial * DIAL_SCALE, 0.0, dial * DIAL_SCALE], device=bias.device)
            folded = bias.detach().float() + shift
            cache[key] = folded.masked_fill(~self.allowed[b].to(bias.device), float("-inf")).to(bias.dtype)
        return cache[key]


def window_weights(valid: torch.Tensor, windows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooling matrix for windowed means over the valid tokens of each row.

    valid: [B, T] bool (prompt tokens; padding False). Returns weights [B, W, T] (rows sum to 1 for real
    windows) and wmask [B, W]; row r uses min(W, n_r) windows of (almost) equal size, in token order.
    """
    valid = valid.bool()
    B, T = valid.shape
    n = valid.sum(1)  # tokens per row
    w_r = torch.minimum(n, torch.full_like(n, windows)).clamp_min(1)
    idx = valid.long().cumsum(1) - 1  # rank of each valid token within its row
    win = torch.div(idx * w_r[:, None], n.clamp_min(1)[:, None], rounding_mode="floor")
    onehot = torch.zeros(B, windows, T, device=valid.device)
    rows, cols = valid.nonzero(as_tuple=True)
    onehot[rows, win[rows, cols], cols] = 1.0
    counts = onehot.sum(2)
    wmask = counts > 0
    weights = onehot / counts.clamp_min(1)[..., None]
    return weights, wmask


def pool(h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Window means [B, W, d] of hidden states h [B, T, d] (weights [B, W, T])."""
    return torch.einsum("bwt,btd->bwd", weights.to(h.dtype), h)


def decide(logits: torch.Tensor, dial: float = 0.0) -> torch.Tensor:
    """Class per row from router logits [B, 3] after the dial shift."""
    if dial:
        shift = torch.tensor([-dial * DIAL_SCALE, 0.0, dial * DIAL_SCALE], device=logits.device)
        logits = torch.log_softmax(logits.float(), -1) + shift
    return logits.argmax(-1)


def guard_residual(x: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Distance of each row of x [N, d] from the affine subspace mean + span(basis rows)."""
    r = x.float() - mean.float()
    basis = basis.float()
    return (r - (r @ basis.T) @ basis).norm(dim=1)


def fit_guard(x: torch.Tensor, rank: int, quantile: float, folds: int = 4) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Out-of-domain guard from in-domain pooled states x [N, d]: mean, top-`rank` principal directions
    [rank, d] and the `quantile` of held-out residuals (each fold measured against the subspace of the
    others: in-sample residuals are too small, since the subspace was fitted to them)."""
    x = x.float()
    n = x.shape[0]
    if n < 2 * folds:
        raise ValueError(f"{n} training prompts, at least {2 * folds} needed")

    def subspace(rows):
        mean = rows.mean(0)
        k = min(rank, rows.shape[0] - 1, rows.shape[1])
        return mean, torch.linalg.svd(rows - mean, full_matrices=False).Vh[:k]

    fold = torch.arange(n) % folds
    held = torch.cat([guard_residual(x[fold == f], *subspace(x[fold != f])) for f in range(folds)])
    mean, basis = subspace(x)
    return mean, basis, float(torch.quantile(held, quantile))
