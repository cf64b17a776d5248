"""What a stage receives and returns. A method's `fit` searches and trains; its `apply` is deterministic
so a run directory or an export can be restored from the plan and tensors alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any


@dataclass
class StageContext:
    model: Any
    tokenizer: Any
    recipe: Any  # Recipe
    index: int  # position of the stage in the recipe
    state_dir: Path | None = None  # where a stage may keep resumable progress
    data: Any = None  # the run's RunData (retrofit/sources.py); None: one is made for this stage alone

    @property
    def seed(self) -> int:
        return self.recipe.seed + self.index

    @property
    def run_data(self):
        if self.data is None:
            from .sources import RunData

            self.data = RunData(self.recipe).bind(self.model, self.tokenizer)
        return self.data

    @cached_property
    def calibration(self):
        """Calibration windows [samples, seq_len] from the recipe's `data.calibration` (read once per run)."""
        return self.run_data.calibration(self.tokenizer)


@dataclass
class StageResult:
    plan: Any  # what the search chose, per layer: the method's typed plan, or its JSON form from `fit`
    tensors: dict = field(default_factory=dict)  # name -> tensor (routers, pools, masks)
    metrics: dict = field(default_factory=dict)  # search figures for the report
