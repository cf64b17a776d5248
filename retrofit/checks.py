"""Checks of a recipe that need no model: what `retrofit` and `search` refuse before loading one, gathered so
that `adaflex recipe validate` refuses the same recipes (README: "validate before you spend compute")."""

from __future__ import annotations

from . import registry
from .errors import UsageError
from .recipe import Recipe
from .sources import run_data


def eval_settings(recipe: Recipe, source: str) -> None:
    """Settings of `eval:` that only make sense together (run_eval would refuse them after the dense run)."""
    for i, ev in enumerate(recipe.eval):
        if ev.task == "perplexity" and (ev.context is None) != (ev.continuation is None):
            raise UsageError(f"{source}: eval.{i}: context and continuation go together")
        if ev.task == "perplexity" and ev.context is None and (ev.stride or 0) > ev.seq_len:
            raise UsageError(f"{source}: eval.{i}.stride: {ev.stride} is larger than seq_len {ev.seq_len}")
        if ev.task == "passkey" and ev.context is None:
            raise UsageError(f"{source}: eval.{i}.context: required by task passkey (prompt length in tokens)")


def stage_order(recipe: Recipe, source: str) -> None:
    """Each method's checks against the other stages of the recipe (Method.check_recipe), e.g. heal runs last."""
    methods = [m for m, _ in recipe.stage_items()]
    for i, (method, cfg) in enumerate(recipe.stage_items()):
        registry.get(method).check_recipe(cfg, i, methods, f"{source}: stages.{i}.{method}")


def needs_data(recipe: Recipe, source: str) -> None:
    for i, (method, cfg) in enumerate(recipe.stage_items()):
        if registry.get(method).needs_calibration(cfg) and recipe.data.calibration is None:
            raise UsageError(f"{source}: data.calibration: required by stages.{i}.{method}")


def search_section(recipe: Recipe, source: str) -> None:
    """The search space as `adaflex search` builds it before loading the model (64 blocks only bounds the
    default knobs, as there)."""
    from .search_space import build

    for sp in build(recipe, 64, where=source):
        cfg = registry.config_class(sp.method).model_validate(sp.base)
        if registry.get(sp.method).needs_calibration(cfg) and recipe.data.calibration is None:
            raise UsageError(f"{source}: data.calibration: required by the {sp.method} stage")


def static(recipe: Recipe, source: str = "recipe", data=None):
    """Everything checkable without a model, data sources read included (the returned RunData holds them)."""
    eval_settings(recipe, source)
    stage_order(recipe, source)
    needs_data(recipe, source)
    if recipe.search is not None:
        search_section(recipe, source)
    return run_data(recipe, data).preflight()
