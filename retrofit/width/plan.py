"""The `width` plan: the dense block shape, each block's kept width (its kept indices, and refit weights, are
the stage's tensors `keep.{b}.channels|heads|groups`, `refit.{b}.down|o`) and the MACs kept."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UsageError
from ..plan import Plan
from .shapes import BlockWidth, Dims, check_width


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DenseShape(_Strict):
    hidden: int = Field(ge=1)
    intermediate: int = Field(ge=1)
    heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    mlp_matrices: int = Field(3, ge=2, le=3)  # 2: a two-matrix MLP (up, down)

    def dims(self) -> Dims:
        return Dims(self.hidden, self.intermediate, self.heads, self.kv_heads, self.head_dim, self.mlp_matrices)


class Width(_Strict):
    channels: int
    kv_groups: int
    per_group: int

    def block(self) -> BlockWidth:
        return BlockWidth(self.channels, self.kv_groups, self.per_group)


class WidthPlan(Plan):
    num_layers: int = Field(ge=1)
    dense: DenseShape
    widths: list[Width]
    uniform: bool
    block_macs_kept: int = Field(ge=0)
    block_macs_dense: int = Field(ge=1)
    removed: float
    allocation: Literal["uniform", "dp", "evo"] | None = None  # (absent from a bare `narrow_plan`)
    importance: Literal["activation", "wanda"] | None = None
    refit: bool | None = None
    target: float | None = None
    search: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.widths) != self.num_layers:
            raise ValueError(f"widths: {len(self.widths)} entries for {self.num_layers} blocks")
        dims = self.dense.dims()
        if dims.heads % dims.kv_heads:
            raise ValueError(f"dense: {dims.heads} heads do not split over {dims.kv_heads} KV heads")
        for b, w in enumerate(self.widths):
            why = check_width(dims, w.block())
            if why:
                raise ValueError(f"widths.{b}: {why}")
        if self.uniform != all(w == self.widths[0] for w in self.widths):
            raise ValueError(f"uniform: {self.uniform}, the widths say otherwise")
        return self

    @property
    def dims(self) -> Dims:
        return self.dense.dims()

    def width(self, b: int) -> BlockWidth:
        return self.widths[b].block()

    def check_model(self, model) -> None:
        from .parts import dims_of  # torch: only when a model is there

        super().check_model(model)
        if dims_of(model, "width plan")[0] != self.dims:
            raise UsageError(f"width plan is for blocks of shape {self.dense.model_dump()}, the model's config "
                             "differs")

    def check_tensors(self, tensors: dict) -> None:
        """Every block's kept indices are there, one per kept channel, KV group and query head."""
        for b in range(self.num_layers):
            idx = [tensors.get(f"keep.{b}.{k}") for k in ("channels", "heads", "groups")]
            if any(t is None for t in idx):
                raise UsageError(f"width plan: the kept indices of block {b} are missing")
            w = self.width(b)
            if (idx[0].numel(), idx[2].numel(), idx[1].numel()) != (w.channels, w.kv_groups, w.heads):
                raise UsageError(f"width plan: the kept indices of block {b} disagree with its width {w.to_dict()}")
