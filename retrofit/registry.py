"""Stage registry: one entry per method folder under retrofit/ (peft's tuner layout).

Each method package exposes METHOD (its recipe key), CONFIG (its pydantic settings) and IMPL (the
module with `fit` and `apply`, imported only when the stage runs, so validating a recipe stays cheap).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from . import drop, kv, prune, routes, shards, width

_METHODS = [drop, prune, width, shards, routes, kv]
# Order in which stages compose (design.md §1); a recipe may list any subset in any order.
METHODS: dict[str, ModuleType] = {m.METHOD: m for m in _METHODS}


def config_class(method: str):
    return METHODS[method].CONFIG


def implementation(method: str) -> ModuleType:
    """The module with `fit(ctx, config) -> StageResult` and `apply(model, plan, tensors)`."""
    return importlib.import_module(METHODS[method].IMPL)
