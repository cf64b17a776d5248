"""Strict pydantic base shared by the recipe and every stage's settings, and the upper bounds of its counts."""

from __future__ import annotations

from typing import Annotated, Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors; values are validated on assignment too (so `--set` is checked).

    Strict types: YAML gives real ints, floats and bools, so nothing needs coercing, and lax mode would read
    `true` as 1 where a count belongs. NaN and inf are refused: no setting means anything at infinity."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, strict=True,
                              allow_inf_nan=False)


class Cap(NamedTuple):
    limit: int
    why: str


# Every count and size in a recipe has an upper bound: a value beyond it cannot be held in memory or finished in
# time, and would otherwise fail deep inside a run (an 8 TB allocation) instead of at the recipe.
TOKENS = Cap(1 << 20, "no supported model has a position table longer than a million tokens")
WINDOWS = Cap(1 << 16, "65,536 windows of the longest 32,768-token window are 16 GiB of token ids")
STEPS = Cap(10**7, "ten million steps or simulations would run for days even at a millisecond each")
BATCH = Cap(4096, "a larger batch of even 512-token windows does not fit in 139 GiB of accelerator memory")
WIDTH = Cap(1 << 16, "no transformer has wider hidden states (a rank or pool size cannot exceed the width)")
BLOCKS = Cap(4096, "no transformer has more blocks")
ITEMS = Cap(10**8, "no evaluation set has a hundred million items")
SEED = Cap(2**32 - 1, "numpy and CUDA generators take 32-bit seeds")


def capped(default: Any = ..., cap: Cap = STEPS, *, ge: int = 0, description: str = "", **kw) -> Any:
    """A Field for an integer count: `ge`, the cap's `le`, and a description that says why the cap is there."""
    sep = "; " if description else ""
    return Field(default, ge=ge, le=cap.limit, description=f"{description}{sep}at most {cap.limit}: {cap.why}", **kw)


BlockIndex = Annotated[int, Field(ge=0, le=BLOCKS.limit, description=f"a block index; {BLOCKS.why}")]
