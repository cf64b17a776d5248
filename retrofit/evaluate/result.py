"""One evaluation's result, as every task returns it and every report stores it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Result:
    task: str
    metric: str
    value: float
    n: int
    extra: dict = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = {"task": self.task, "metric": self.metric, "value": self.value, "n": self.n}
        out.update(self.extra)
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else None
        return out
