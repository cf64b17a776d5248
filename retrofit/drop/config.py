"""Settings of the `drop` stage: static removal of whole blocks by block influence (ShortGPT)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import BLOCKS, BlockIndex, Strict, capped


class DropConfig(Strict):
    blocks: int | None = capped(None, BLOCKS, ge=1, description="number of blocks to remove")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of blocks to remove (rounded)")
    score: Literal["block_influence"] = "block_influence"
    protect: list[BlockIndex] = Field(default_factory=list, max_length=BLOCKS.limit,
        description="block indices never removed")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.blocks is None) == (self.fraction is None):
            raise ValueError("give exactly one of 'blocks' or 'fraction'")
        return self

    def count(self, num_layers: int) -> int:
        k = self.blocks if self.blocks is not None else round(self.fraction * num_layers)
        if not 1 <= k < num_layers:
            raise ValueError(f"cannot remove {k} of {num_layers} blocks")
        return k
