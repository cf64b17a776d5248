"""The `kv` plan: the stage's settings and the per-layer (per-KV-head) budget fractions its offline
allocation found (no tensors: an export carries the plan alone)."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..errors import UsageError
from ..plan import Plan
from .config import KVConfig


class KVPlan(Plan):
    num_layers: int = Field(ge=1)
    config: KVConfig
    fractions: list[float] | None  # per layer (null: the allocation's own rule, no offline plan)
    prefixkv: list[float] | None = None  # offline allocations: PrefixKV's and CAKE's plans, for reports
    cake_average: list[float] | None = None
    head_fractions: list[list[float]] | None = None  # per layer, per KV head (`fractions` holds their means)

    @model_validator(mode="after")
    def _lengths(self):
        for key in ("fractions", "prefixkv", "cake_average", "head_fractions"):
            v = getattr(self, key)
            if v is not None and len(v) != self.num_layers:
                raise ValueError(f"{key}: has {len(v)} entries, num_layers is {self.num_layers}")
        if self.head_fractions and len({len(row) for row in self.head_fractions}) != 1:
            raise ValueError("head_fractions: layers with different numbers of KV heads")
        for key in ("fractions", "head_fractions"):
            v = getattr(self, key)
            flat = [x for row in v for x in (row if isinstance(row, list) else [row])] if v else []
            if any(not 0 <= x <= 1 for x in flat):
                raise ValueError(f"{key}: a fraction outside [0, 1]")
        return self

    def check_model(self, model) -> None:
        from ..arch import decoder_layers, kv_heads

        n = len(decoder_layers(model))
        if self.num_layers != n:
            raise UsageError(f"kv plan: num_layers is {self.num_layers}, the model has {n} layers")
        if self.head_fractions is not None:
            got, want = (n, len(self.head_fractions[0])), (n, kv_heads(model.config))
            if got != want:
                raise UsageError(f"kv plan: head_fractions has shape {got}, the model has {want[0]} layers of "
                                 f"{want[1]} KV heads")
