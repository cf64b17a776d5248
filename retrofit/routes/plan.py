"""The `routes` plan: a fixed path for every input (`policy: path`), or routers (the stage's tensors
`router.*`) read with the plan's windows and dial (`policy: routers`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..errors import UsageError
from ..plan import Plan
from ..schema import BlockIndex


class RoutesPlan(Plan):
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    # the defaults are those of plans written before the key existed
    windows: int = Field(8, ge=1)
    bottleneck: int | None = Field(None, ge=1)
    fallback_dense: bool = False
    max_executed: float | None = None
    guard: float | None = None
    policy: Literal["path", "routers"] = "routers"
    path: list[BlockIndex] | None = None
    dial: float = Field(0.0, ge=-1, le=1)
    labels: dict[str, Any] | None = None  # policy routers: what MCTS labelled (counts, block evaluations)

    @model_validator(mode="after")
    def _path(self):
        if (self.policy == "path") != (self.path is not None):
            raise ValueError("path: given exactly when policy is 'path'")
        if self.path is not None:
            from .runtime import path_counts  # (torch: only a path plan loads it)

            try:
                path_counts(self.path, self.num_layers)
            except UsageError as e:
                raise ValueError(str(e)) from None
        return self

    def check_model(self, model) -> None:
        from ..arch import decoder_layers

        L, d = len(decoder_layers(model)), model.config.hidden_size
        if self.num_layers != L or self.hidden_size != d:
            raise UsageError(f"routes: routers saved for a model with {self.num_layers} blocks of width "
                             f"{self.hidden_size}; this model has {L} blocks of width {d}")

    def check_tensors(self, tensors: dict) -> None:
        """Saved routers (if any) are one per planned block, reading states of the planned width."""
        blocks = {k.split(".")[2] for k in tensors if k.startswith("router.blocks.")}
        if not any(k.startswith("router.") for k in tensors):
            return
        w = tensors.get("router.blocks.0.0.weight")
        if len(blocks) != self.num_layers or w is None or w.shape[1] != self.hidden_size:
            got_d = None if w is None else w.shape[1]
            raise UsageError(f"routes: routers saved for {len(blocks)} blocks of width {got_d}; "
                             f"the plan says {self.num_layers} of width {self.hidden_size}")
