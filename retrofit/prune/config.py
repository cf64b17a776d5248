"""Settings of the `prune` stage: unstructured or N:M weight pruning with per-block (or per-linear)
sparsities chosen uniformly, by OWL's outlier ratios, or by a knapsack DP over measured distortion curves."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import BATCH, BLOCKS, WINDOWS, BlockIndex, Strict, capped

_NM = re.compile(r"^(\d+):(\d+)$")


class PruneConfig(Strict):
    # (pattern and allocation come first so that the checks of later keys can see them)
    pattern: str = Field("unstructured", description="'unstructured' or N:M (e.g. 2:4: keep N of every M inputs)")
    allocation: Literal["uniform", "owl", "dp"] = Field(
        "uniform", description="how the global sparsity is spread over blocks: same everywhere, OWL, or RD-style DP")
    sparsity: float = Field(0.5, ge=0, lt=1, description="global share of block-linear weights set to zero")
    score: Literal["magnitude", "wanda"] = Field("wanda", description="|W|, or |W|·‖X‖ over calibration tokens")
    compare: Literal["auto", "row", "layer"] = Field(
        "auto", description="unstructured: rank scores per output row or over the whole matrix "
                            "(auto: row for wanda, layer for magnitude, as the papers)")
    # OWL
    owl_lambda: float = Field(0.08, ge=0, le=0.5, description="OWL: half-width λ of the per-block sparsity spread")
    owl_m: float = Field(5.0, gt=0, description="OWL: a score is an outlier above M × the block's mean score")
    # DP (RD pruning)
    units: Literal["block", "sublayer", "linear"] = Field(
        "block", description="dp: what gets one sparsity (a block; attention/MLP of a block; each linear)")
    levels: int | list[float] = Field(
        11, description="dp: K grid points evenly spaced over [0, 1] less the top one (K=11: 0, 0.1, ..., 0.9), "
                        "or an explicit list; levels above max_sparsity are left out, the target is always added")
    max_sparsity: float = Field(0.95, gt=0, lt=1, description="owl/dp: no unit pruned above this (drops aside)")
    granularity: float = Field(1e-3, gt=0, le=0.1, description="dp: budget step as a fraction of all weights")
    allow_drop: bool = Field(False, description="dp: a block may also be removed whole (depth and width compete)")
    protect: list[BlockIndex] = Field(default_factory=list, max_length=BLOCKS.limit,
        description="dp with allow_drop: blocks never removed")
    distortion: Literal["mse", "kl"] = Field(
        "mse", description="dp: output distortion vs the dense model: MSE of (centred) logits, or KL divergence")
    curve_samples: int | None = capped(
        None, WINDOWS, ge=1, description="dp: calibration windows used to measure curves (default min(8, samples))")
    additivity_samples: int = Field(4, ge=0, le=64, description="dp: random allocations measured for the "
                                                                 "additivity rank correlation")
    batch_size: int = capped(8, BATCH, ge=1, description="calibration windows per forward")

    @field_validator("pattern", mode="before")
    @classmethod
    def _sexagesimal(cls, v):
        # YAML 1.1 (PyYAML) reads an unquoted 2:4 as the base-60 integer 124: give the pattern back
        if isinstance(v, int) and not isinstance(v, bool) and v >= 60:
            return f"{v // 60}:{v % 60}"
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = _NM.match(v)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"'{v}' is neither 'unstructured' nor N:M with 0 < N < M (e.g. 2:4)")
        return v

    @field_validator("levels")
    @classmethod
    def _levels(cls, v):
        if isinstance(v, int):
            if not 2 <= v <= 201:
                raise ValueError("K levels must lie in 2..201")
            return v
        if len(v) < 1 or any(not 0 <= x < 1 for x in v):
            raise ValueError("explicit levels must lie in [0, 1)")
        return sorted(set(v))

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, v, info):
        nm = _NM.match(info.data.get("pattern") or "")
        if v == "owl" and nm:
            raise ValueError(f"pattern {nm.group(0)} fixes the sparsity of every pruned linear; 'owl' varies it per "
                             "block and needs pattern 'unstructured' (use 'uniform' or 'dp')")
        return v

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v, info):
        nm = _NM.match(info.data.get("pattern") or "")
        if nm and info.data.get("allocation") == "uniform":
            fixed = (int(nm.group(2)) - int(nm.group(1))) / int(nm.group(2))
            if abs(v - fixed) > 1e-9:
                raise ValueError(f"pattern {nm.group(0)} prunes exactly {fixed:g} of every linear; set {fixed:g}, "
                                 f"or allocation 'dp' to mix {nm.group(0)} and dense blocks")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.allow_drop and (self.allocation != "dp" or self.units != "block"):
            raise ValueError("allow_drop: whole blocks are dropped only by allocation 'dp' with units 'block'")
        if self.protect and not self.allow_drop:
            raise ValueError("protect: only meaningful with allow_drop")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        m = _NM.match(self.pattern)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @property
    def row_compare(self) -> bool:
        return self.compare == "row" or (self.compare == "auto" and self.score == "wanda")

    def level_grid(self) -> list[float]:
        """DP levels: the grid (capped at max_sparsity) plus the target; N:M allows only 0 and (M-N)/M."""
        nm = self.nm
        if nm is not None:
            return [0.0, (nm[1] - nm[0]) / nm[1]]
        grid = [i / (self.levels - 1) for i in range(self.levels - 1)] if isinstance(self.levels, int) else self.levels
        grid = {round(x, 10) for x in grid if x <= self.max_sparsity + 1e-12}
        grid |= {0.0}
        if self.sparsity <= self.max_sparsity:
            grid.add(round(self.sparsity, 10))
        return sorted(grid)


def needs_calibration(config: PruneConfig) -> bool:
    """Wanda scores, OWL's outlier ratios and the DP's distortion curves are measured on calibration windows."""
    return config.score == "wanda" or config.allocation in ("owl", "dp")
