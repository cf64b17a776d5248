"""The `heal` plan: what was trained, and how load puts it back. Its tensors: `weight.{param}` (absent once an
export baked them: `weights_baked`), `adapter.*` (the `shards` layout of `adapter`), `replace.{j}.a|b`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UsageError
from ..plan import Plan
from ..schema import BlockIndex
from ..shards.plan import ShardsPlan
from .config import Trainable


class Run(BaseModel):
    """A run of removed dense blocks and the kept block it follows (-1: before the first)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    after: int = Field(ge=-1)
    blocks: list[BlockIndex] = Field(min_length=1)


class HealPlan(Plan):
    train: list[Trainable] = Field(min_length=1)
    params: list[str]  # base parameters trained (norms, head, last blocks)
    adapter: ShardsPlan | None
    unmerged: list[str]  # adapted linears left unmerged (pruned: a merged ΔW would fill their zeros)
    replacements: list[Run]
    replacement_rank: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_layers: int = Field(ge=1)
    weights_baked: bool = False  # an export's entry only: the weights and mergeable adapters are in its weights

    @model_validator(mode="after")
    def _consistent(self):
        if self.adapter is None and self.unmerged:
            raise ValueError("unmerged: adapters listed, the plan has no adapter")
        if self.adapter is not None and self.adapter.num_layers != self.num_layers:
            raise ValueError(f"adapter.num_layers: {self.adapter.num_layers}, num_layers is {self.num_layers}")
        for j, run in enumerate(self.replacements):
            if run.after >= self.num_layers:
                raise ValueError(f"replacements.{j}.after: block {run.after} out of range -1..{self.num_layers - 1}")
        return self

    def check_tensors(self, tensors: dict) -> None:
        """The trained weights (unless baked), the adapters and each replacement's factors are there."""
        missing = [k for k in (f"weight.{p}" for p in self.params) if not self.weights_baked and k not in tensors]
        missing += [f"replace.{j}.{s}" for j in range(len(self.replacements)) for s in ("a", "b")
                    if f"replace.{j}.{s}" not in tensors]
        if missing:
            raise UsageError(f"heal: trained tensors missing: {', '.join(missing[:3])}")
        d, r = self.hidden_size, self.replacement_rank
        for j in range(len(self.replacements)):
            for s, shape in (("a", (r, d)), ("b", (d, r))):
                got = tuple(tensors[f"replace.{j}.{s}"].shape)
                if got != shape:
                    raise UsageError(f"heal: replace.{j}.{s} has shape {got}, the plan needs {shape}")
        if self.adapter is not None:
            self.adapter.check_tensors(adapter_tensors(tensors))


def adapter_tensors(tensors: dict) -> dict:
    """The adapter's tensors among the stage's, in the `shards` layout."""
    return {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
