"""Typed plans: the base of every method's plan model (`Method.plan`, retrofit/method.py), and the one place a
plan read back from disk or handed over by `fit` is validated (`read`).

A plan model describes exactly the keys that method's plans hold: the JSON form (plan.json, an export's
config.json) is `dump()`, which keeps the field order and leaves out the optional keys a plan did not have, so
what a run writes does not change when it passes through the model. Validators hold the checks of the plan on
its own (lengths equal to `num_layers`, kept and removed disjoint, shapes); `check_model` and `check_tensors`
hold the checks of a model and of the stage's tensors against the plan, run by `apply`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UsageError

_KEYED = re.compile(r"^[\w.]+: ")


class Plan(BaseModel):
    """Unknown keys are errors; strict types (a plan is JSON that adaflex wrote: nothing needs coercing).
    Every method's plan has a `num_layers`: the block count of the model it was fitted on."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=True)

    def dump(self) -> dict:
        """The JSON form: the keys this plan was made with, in field order (byte-identical to what fit wrote)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def check_model(self, model) -> None:
        """The model has the planned block count (a method with more to check extends this)."""
        from .arch import decoder_layers

        n = len(decoder_layers(model))
        if n != self.num_layers:
            raise UsageError(f"{self.label()} plan is for {self.num_layers} blocks, the model has {n}")

    def check_tensors(self, tensors: dict) -> None:
        """The stage's tensors agree with the plan (names present, sizes); default: no tensors to check."""
        return None

    @classmethod
    def label(cls) -> str:
        return cls.__module__.split(".")[-2]


def read(model: type[Plan], data: Any, where: str) -> Plan:
    """`data` (a dict from JSON, or a plan already typed) as a `model`; a plan that does not fit is a one-line
    UsageError naming `where` and the key: `runs/x/plan.json: stages.1.plan.removed: ...`."""
    if isinstance(data, model):
        return data
    if isinstance(data, Plan):
        data = data.dump()
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        bad = f" (got {err['input']!r})" if err["type"] not in ("missing", "value_error") and _short(err) else ""
        if err["type"] == "value_error" and _KEYED.match(msg):  # a model validator names its key: "removed: ..."
            key, msg = msg.split(": ", 1)
            loc = f"{loc}.{key}" if loc else key
        raise UsageError(f"{where}{'.' + loc if loc else ''}: {msg}{bad}") from None


def _short(err: dict) -> bool:
    return isinstance(err.get("input"), (int, float, str, bool, type(None))) and len(repr(err["input"])) <= 60
