"""What a budgeted KV cache is asked to keep: the stage settings and plan resolved into one `KVSpec`, and the bytes
a stored value costs in each storage type."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from adaflex.search import kv_alloc

from ..arch.shape import held_tokens
from .policies import Policy

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # storage types other than model / int8


def storage_bytes_per_value(storage: str, model_dtype: torch.dtype, head_dim: int) -> float:
    """Bytes a stored value costs relative to the model's dtype."""
    model = torch.finfo(model_dtype).bits / 8
    if storage == "model":
        return 1.0
    if storage == "int8":
        return (1 + 4 / head_dim) / model
    return (torch.finfo(STORAGE_DTYPES[storage]).bits / 8) / model


@dataclass
class KVSpec:
    """Everything a cache needs, resolved from the stage settings and its plan (JSON-able but the policy)."""

    num_layers: int
    policy: Policy
    budget: float | None = 0.25
    tokens: int | None = None
    allocation: str = "uniform"
    sinks: int = 4
    window: int = 32
    recent: float = 0.0
    floor: int = 36
    beta: float = 20.0
    tau1: float = 1.0
    tau2: float = 1.0
    decode: bool = True
    fractions: list[float] | None = None  # static per-layer plan (prefixkv, searched, explicit)
    head_fractions: list[list[float]] | None = None  # or per (layer, KV head): heads keep different counts
    storage: str = "model"  # element type of the stored keys/values: model, float16, bfloat16, int8
    bytes_per_value: float = 1.0  # stored bytes per value relative to the model's dtype (int8: + scales)
    windows: list[int | None] | None = None  # per layer: its sliding window (arch.windows), None: full attention
    extra: dict = field(default_factory=dict)

    @property
    def token_fraction(self) -> float:
        """Share of the tokens kept: the byte budget divided by the bytes each stored token costs."""
        return min(1.0, self.budget / self.bytes_per_value) if self.budget is not None else 1.0

    @property
    def cascades(self) -> bool:
        """CAKE's run-time allocation (no static plan, per layer or per head, given)."""
        return self.allocation == "cake" and self.fractions is None and self.head_fractions is None

    @property
    def is_full(self) -> bool:
        return self.tokens is None and self.token_fraction >= 1.0

    def mean_count(self, length: int) -> int:
        """Tokens a layer keeps on average for a prompt of `length` tokens."""
        if self.tokens is not None:
            return min(self.tokens, length)
        return min(length, int(round(self.token_fraction * length)))

    def held(self, length: int) -> np.ndarray:
        """Per layer, the tokens the full cache holds after `length`: a sliding layer at most window - 1 (what
        later queries can still see), as the dense KV bytes count them (arch/reference.py)."""
        windows = self.windows or [None] * self.num_layers
        return np.array([held_tokens(w, length) for w in windows], dtype=np.int64)

    def total(self, length: int) -> int:
        """Tokens all layers keep together: the budget's share of what the full cache holds (`held`)."""
        if not self.windows:
            lo = min(self.floor, length) * self.num_layers
            return int(min(max(self.mean_count(length) * self.num_layers, lo), length * self.num_layers))
        held = self.held(length)
        lo = int(np.minimum(self.floor, held).sum())
        want = (np.minimum(self.tokens, held).sum() if self.tokens is not None
                else round(self.token_fraction * held.sum()))
        return int(min(max(int(want), lo), held.sum()))

    def static_counts(self, length: int) -> np.ndarray:
        """Per-layer token counts of a static plan for a prompt of `length` tokens (sum = total; a sliding layer
        at most window - 1, what it would not hold goes to the others)."""
        total, n, held = self.total(length), self.num_layers, self.held(length)
        floor = np.minimum(self.floor, held)
        if self.fractions is not None:
            return kv_alloc.plan_counts(self.fractions, length, total=total, min_keep=floor, lengths=held)
        if self.allocation == "pyramid":
            return kv_alloc.pyramid(n, total, beta=self.beta, lengths=held, min_keep=floor)
        return kv_alloc.uniform(n, total, lengths=held, min_keep=floor)

    def static_head_counts(self, length: int) -> np.ndarray | None:
        """Per (layer, KV head) token counts of a per-head plan [L, H] (sum = total · H), None without one."""
        if self.head_fractions is None:
            return None
        f = np.asarray(self.head_fractions, dtype=np.float64)
        held = np.repeat(self.held(length), f.shape[1])
        counts = kv_alloc.plan_counts(f.ravel(), length, total=self.total(length) * f.shape[1],
                                      min_keep=np.minimum(self.floor, held), lengths=held)
        return counts.reshape(f.shape)
