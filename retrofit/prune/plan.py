"""The `prune` plan: every block linear's measured sparsity (masks in the stage's tensors, `mask.{block}.{name}`),
the blocks removed whole, and what the allocation found (OWL's outlier ratios, the DP's curves)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..drop.plan import check_partition
from ..errors import UsageError
from ..plan import Plan
from ..schema import BlockIndex


class Linear(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    block: BlockIndex
    name: str
    shape: list[int] = Field(min_length=2, max_length=2)
    target: float
    expert: int | None = Field(default=None, ge=0)  # an expert's slice of the 3-D parameter `param` (MoE)
    transposed: bool = False  # present (true) only for GPT-2's Conv1D: shape and mask are `param`'s transpose
    removed: bool = False  # present (true) only for the linears of removed blocks
    param: str | None  # the weight's name after the removal of blocks (None: removed)
    pruned: int = Field(ge=0)
    sparsity: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _removed_has_no_param(self):
        if self.removed != (self.param is None):
            raise ValueError("param: a removed linear has none (null), a kept one names its weight")
        return self


class SemiStructured(BaseModel):
    """2:4 only: which weights a sparse kernel would refuse, in the model's dtype and in float16."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dtype: str
    ok: bool
    problems: dict[str, Any]
    float16_ok: bool
    float16_problems: dict[str, Any]


class PrunePlan(Plan):
    num_layers: int = Field(ge=1)
    allocation: Literal["uniform", "owl", "dp"]
    score: Literal["magnitude", "wanda"]
    pattern: str
    target: float
    achieved: float = Field(ge=0, le=1)
    block_sparsity: list[float]
    removed: list[BlockIndex]
    kept: list[BlockIndex]
    linears: list[Linear]
    owl: dict[str, Any] | None = None  # allocation owl: the outlier ratios (lod) and settings
    dp: dict[str, Any] | None = None  # allocation dp: curves, levels chosen, additivity
    semi_structured: SemiStructured | None = None

    @model_validator(mode="after")
    def _consistent(self):
        check_partition(self.num_layers, self.removed, self.kept)
        if len(self.block_sparsity) != self.num_layers:
            raise ValueError(f"block_sparsity: {len(self.block_sparsity)} entries for {self.num_layers} blocks")
        for j, e in enumerate(self.linears):
            if e.block >= self.num_layers:
                raise ValueError(f"linears.{j}.block: {e.block} out of range 0..{self.num_layers - 1}")
            if e.removed != (e.block in self.removed):
                raise ValueError(f"linears.{j}.removed: block {e.block} is {'' if e.removed else 'not '}removed "
                                 f"here, {'not ' if e.removed else ''}in `removed`")
        return self

    def check_model(self, model) -> None:
        from .scores import Transposed, block_linears

        super().check_model(model)
        from ..arch import decoder_layers

        mods = [dict(block_linears(blk)) for blk in decoder_layers(model)]
        for e in self.linears:
            w = mods[e.block].get(e.name)
            if w is None:
                raise UsageError(f"prune plan: block {e.block} has no linear {e.name}")
            if isinstance(w, Transposed) != e.transposed:  # a mask of the transpose must not land on [in, out]
                raise UsageError(f"prune plan: {e.name} of block {e.block} is planned {'' if e.transposed else 'un'}"
                                 f"transposed, the model's is {'not ' if e.transposed else ''}a Conv1D")
            if list(w.weight.shape) != e.shape:
                raise UsageError(f"prune plan: {e.name} of block {e.block} has shape {list(w.weight.shape)}, "
                                 f"planned {e.shape}")

    def check_tensors(self, tensors: dict) -> None:
        """Each mask belongs to a kept planned linear and holds one bit per weight (bit-packed)."""
        shapes = {f"mask.{e.block}.{e.name}": e.shape for e in self.linears if not e.removed}
        for k, t in tensors.items():
            if k not in shapes:
                raise UsageError(f"prune: tensor {k} is no mask of a kept planned linear")
            if t.numel() != math.ceil(math.prod(shapes[k]) / 8):
                raise UsageError(f"prune: mask {k} holds {t.numel()} bytes, the linear {shapes[k]} needs "
                                 f"{math.ceil(math.prod(shapes[k]) / 8)}")
