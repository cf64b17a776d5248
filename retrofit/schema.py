"""Strict pydantic base shared by the recipe and every stage's settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors; values are validated on assignment too (so `--set` is checked)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)
