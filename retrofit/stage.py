"""What a stage receives and returns. A method's `fit` searches and trains; its `apply` is deterministic
so a run directory or an export can be restored from the plan and tensors alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .data import calibration_windows, read_text


@dataclass
class StageContext:
    model: Any
    tokenizer: Any
    recipe: Any  # Recipe
    index: int  # position of the stage in the recipe
    state_dir: Path | None = None  # where a stage may keep resumable progress

    @property
    def seed(self) -> int:
        return self.recipe.seed + self.index

    @cached_property
    def calibration(self):
        """Calibration windows [samples, seq_len] from the recipe's `data.calibration`."""
        cal = self.recipe.data.calibration
        if cal is None:
            from .errors import UsageError

            raise UsageError("recipe: data.calibration: required by this stage")
        text = read_text(cal.path, cal.layout)
        return calibration_windows(self.tokenizer, text, cal.samples, cal.seq_len, self.recipe.seed, cal.path)


@dataclass
class StageResult:
    plan: dict  # JSON: what the search chose, per layer
    tensors: dict = field(default_factory=dict)  # name -> tensor (routers, pools, masks)
    metrics: dict = field(default_factory=dict)  # search figures for the report
