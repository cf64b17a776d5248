"""The `drop` plan: which blocks of the fitted model are removed, by block influence."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..plan import Plan
from ..schema import BlockIndex


class DropPlan(Plan):
    num_layers: int = Field(ge=1)
    removed: list[BlockIndex]
    kept: list[BlockIndex]
    block_influence: list[float]

    @model_validator(mode="after")
    def _partition(self):
        check_partition(self.num_layers, self.removed, self.kept)
        if len(self.block_influence) != self.num_layers:
            raise ValueError(f"block_influence: {len(self.block_influence)} entries for {self.num_layers} blocks")
        return self


def check_partition(n: int, removed: list[int], kept: list[int]) -> None:
    """`kept` and `removed`, each ascending, split the blocks 0..n-1 between them (prune's plan holds them too)."""
    for key, ix in (("removed", removed), ("kept", kept)):
        if ix != sorted(set(ix)):
            raise ValueError(f"{key}: {ix} is not ascending without repeats")
        if ix and ix[-1] >= n:
            raise ValueError(f"{key}: block {ix[-1]} out of range 0..{n - 1}")
    if set(removed) & set(kept):
        raise ValueError(f"removed: blocks {sorted(set(removed) & set(kept))} are also kept")
    if len(removed) + len(kept) != n:
        raise ValueError(f"kept: {len(kept)} blocks kept and {len(removed)} removed, num_layers is {n}")
    if not kept:
        raise ValueError("kept: no block left")
