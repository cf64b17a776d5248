"""The cost-model setting of a list of stages (search/cost.py's `Setting`): each method's own `cost` rule
(`retrofit.method.Method.cost`) says what its settings or plan do to the model, in cost terms."""

from __future__ import annotations

from adaflex.retrofit import registry
from adaflex.retrofit.method import CostState
from adaflex.search.cost import Setting, Shape


def setting_of(
    stages: list[tuple[str, object, dict | None, dict]],
    shape: Shape,
    context: int,
    sparse_kernel: bool = False,
    model_bytes: float = 4.0,
) -> Setting:
    """The cost-model setting of stages in order: (method, config, plan or None, metrics). Each method's
    `cost` rule updates the state; without a plan a stage is predicted from its settings, spending its
    whole allowance."""
    state = CostState(shape=shape, context=context, model_bytes=model_bytes)
    for method, cfg, plan, metrics in stages:
        registry.get(method).cost(cfg, plan, metrics, state)
    return state.setting(sparse_kernel)
