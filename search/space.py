"""Search spaces of `adaflex search`: knobs (a range or a list of choices) that an Optuna trial samples.

Pure: a knob knows how to ask a trial for a value (`suggest_float`, `suggest_int`, `suggest_categorical`,
duck-typed) and which values bound it (`corners`, used to find the cheapest point of a space before any
trial runs). In a recipe's `search:` section a knob is written as a list (choices), a mapping
`{low, high, log, step}` (a range) or a scalar (fixed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knob:
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    integer: bool = False
    log: bool = False
    step: float | None = None

    def __post_init__(self):
        if self.choices is None:
            if self.low is None or self.high is None or not self.low <= self.high:
                raise ValueError(f"a range needs low <= high, got {self.low}..{self.high}")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
        elif not self.choices:
            raise ValueError("a list of choices cannot be empty")

    @classmethod
    def of(cls, value: Any) -> Knob | None:
        """A knob from its recipe form (or a knob as it is); None for a scalar (a fixed value). ValueError says
        what is wrong."""
        if isinstance(value, Knob):
            return value
        if isinstance(value, list):
            if any(isinstance(v, (list, dict)) for v in value):
                raise ValueError("choices must be scalars")
            return cls(choices=tuple(value))
        if isinstance(value, dict):
            extra = set(value) - {"low", "high", "log", "step"}
            if extra or "low" not in value or "high" not in value:
                raise ValueError("a range is {low, high[, log, step]}")
            lo, hi = value["low"], value["high"]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)):
                raise ValueError("low and high must be numbers")
            integer = isinstance(lo, int) and isinstance(hi, int) and not isinstance(value.get("step", 1), float)
            return cls(low=lo, high=hi, integer=integer, log=bool(value.get("log", False)), step=value.get("step"))
        return None

    def suggest(self, trial, name: str):
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def corners(self) -> list:
        """The values that bound the knob: every choice, or both ends of the range."""
        if self.choices is not None:
            return list(self.choices)
        return [self.low] if self.low == self.high else [self.low, self.high]

    def clip(self, value):
        """The nearest value of the knob's domain (to enqueue a recipe's own setting)."""
        if self.choices is not None:
            return value if value in self.choices else self.choices[0]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return self.low
        v = min(max(value, self.low), self.high)
        return int(round(v)) if self.integer else float(v)

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(str(c) for c in self.choices) + "}"
        return f"[{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def corner_points(knobs: dict[str, Knob], limit: int = 100_000) -> list[dict] | None:
    """Every combination of the knobs' corners (None when there are more than `limit`)."""
    names = list(knobs)
    values = [knobs[n].corners() for n in names]
    count = 1
    for v in values:
        count *= len(v)
    if count > limit:
        return None
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]
