"""The adapter modules: shard pools shared by all layers, and the per-linear delta (MoS or LoRA).

A delta hangs on the base `nn.Linear` as `adaflex_delta` and is added by a forward hook, so the base
weight keeps its Hugging Face name (export writes it untouched) and every adapter tensor has "adaflex"
in its name (export leaves it out of model.safetensors, evaluate counts it as trainable). The pools
live once on the model as `model.adaflex_shards[type]`; a layer's delta only points at its pool (not a
submodule), so state dicts and parameter counts see each pool once.

Layout (the same as adaflex_kernels/shard_lora.py):
    pool_a [n_a, d_in / l],  idx_a [r, l]: row k of A    = concat_j pool_a[idx_a[k, j]]
    pool_b [n_b, d_out / l], idx_b [r, l]: column k of B = concat_j pool_b[idx_b[k, j]]
    ΔW = B·A·alpha/r
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from adaflex.kernels import shard_lora_linear

from ..state import state_of
from . import experts as ex

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype that holds indices 0..n-1 (safetensors stores all of these)."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 15:
        return torch.int16
    if n <= 1 << 31:
        return torch.int32
    return torch.int64


class ShardPool(nn.Module):
    """One projection type's pools: e·L·l rows of d_in/l (A) and e·L·l rows of d_out/l (B's columns)."""

    def __init__(self, n_shards: int, d_in: int, d_out: int, n_sh: int, dtype=torch.float32):
        super().__init__()
        self.d_in, self.d_out, self.n_sh = d_in, d_out, n_sh
        self.pool_a = nn.Parameter(torch.empty(n_shards, d_in // n_sh, dtype=dtype))
        self.pool_b = nn.Parameter(torch.zeros(n_shards, d_out // n_sh, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # LoRA's A init (kaiming_uniform, a=√5) with the fan of the full width d_in, so an assembled row
        # has LoRA's scale; B zero, so ΔW = 0 at the start.
        bound = 1 / math.sqrt(self.d_in)
        self.pool_a.copy_(torch.rand(self.pool_a.shape, generator=generator) * 2 * bound - bound)
        self.pool_b.zero_()


class _Delta(nn.Module):
    def __init__(self, rank: int, scale: float, dropout: float):
        super().__init__()
        self.rank, self.scale = rank, scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:  # A [r, d_in], B [d_out, r]
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b.float() @ a.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return (self.dropout(x) @ a.T.to(x.dtype)) @ b.T.to(x.dtype) * self.scale


class MoSDelta(_Delta):
    """A layer's rank-r adapter assembled from its type's pools by fixed index vectors."""

    def __init__(self, pool: ShardPool, idx_a: torch.Tensor, idx_b: torch.Tensor, scale: float, dropout: float):
        super().__init__(idx_a.shape[0], scale, dropout)
        object.__setattr__(self, "pool", pool)  # shared: not registered here
        self.register_buffer("idx_a", idx_a.long(), persistent=False)
        self.register_buffer("idx_b", idx_b.long(), persistent=False)

    def factors(self):
        p = self.pool
        a = p.pool_a[self.idx_a].reshape(self.rank, p.d_in)
        b = p.pool_b[self.idx_b].reshape(self.rank, p.d_out).T
        return a, b


class LoraDelta(_Delta):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float):
        super().__init__(a.shape[0], scale, dropout)
        self.adaflex_a = nn.Parameter(a.clone())
        self.adaflex_b = nn.Parameter(b.clone())

    def factors(self):
        return self.adaflex_a, self.adaflex_b


def _adapted_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    delta = linear.adaflex_delta
    if not isinstance(linear, nn.Linear):  # GPT-2's Conv1D: its own forward (weight [in, out]), then ΔW
        out = type(linear).forward(linear, x)
        return out + delta(x) if delta.enabled else out
    if not delta.enabled:
        return F.linear(x, linear.weight, linear.bias)
    if isinstance(delta, MoSDelta) and not (delta.training and isinstance(delta.dropout, nn.Dropout)):
        # inference (or training without dropout): one fused shard-LoRA kernel where Triton runs (the
        # dispatcher takes the torch reference on CPU and whenever autograd needs gradients)
        p = delta.pool
        return shard_lora_linear(x, linear.weight, p.pool_a, delta.idx_a, p.pool_b, delta.idx_b, delta.scale,
                                 linear.bias)
    return F.linear(x, linear.weight, linear.bias) + delta(x)


def attach(linear: nn.Linear | ex.Site, delta: _Delta | ex.ExpertsDelta) -> None:
    if isinstance(linear, ex.Site):  # a 3-D experts parameter (experts.py)
        ex.attach(linear, delta)
        return
    detach(linear)
    delta.train(linear.training)  # a new module starts in training mode: follow the model's
    linear.adaflex_delta = delta
    # an instance-level forward (not a hook) so the fused kernel can replace the base matmul too;
    # forward hooks (cost counting, calibration) still see the linear's input and output
    linear.forward = partial(_adapted_forward, linear)


def detach(linear: nn.Module | ex.Site) -> None:
    if isinstance(linear, ex.Site):
        ex.detach(linear)
        return
    linear.__dict__.pop("forward", None)
    if "adaflex_delta" in linear._modules:
        del linear._modules["adaflex_delta"]


def adapted(model) -> list[tuple[str, nn.Linear | ex.Site]]:
    """(name, linear or 3-D experts parameter) of every adapter installed (the name peft gives its target)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "adaflex_delta", None), _Delta)]
    return linears + ex.adapted(model)


def remove_all(model) -> None:
    for _, m in adapted(model):
        detach(m)
    if hasattr(model, "adaflex_shards"):
        del model.adaflex_shards
    state_of(model).unpatched("shards")


def record(model) -> None:
    """The adapted linears are a patch of `model` (retrofit/state.py), undone by `remove_all`."""
    state_of(model).patched("shards", _undo)


def _undo(model, _saved) -> None:
    remove_all(model)


@torch.no_grad()
def merge_all(model) -> None:
    """Add every ΔW into its base weight and remove the adapters."""
    for _, m in adapted(model):
        merge(m)
    remove_all(model)


@torch.no_grad()
def merge(m: nn.Module) -> None:
    """Add one adapter's ΔW into its base weight (kept attached)."""
    if isinstance(m, ex.Site):
        ex.merge(m)
        return
    dw = m.adaflex_delta.delta_weight().to(m.weight.dtype)
    m.weight.add_(dw if isinstance(m, nn.Linear) else dw.T)  # GPT-2's Conv1D stores [in, out]


@contextmanager
def disabled(model):
    """Run the model as it was before this stage (the `input` teacher)."""
    deltas = [m.adaflex_delta for _, m in adapted(model)]
    before = [d.enabled for d in deltas]
    for d in deltas:
        d.enabled = False
    try:
        yield model
    finally:
        for d, b in zip(deltas, before, strict=True):
            d.enabled = b
