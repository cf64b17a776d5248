"""Stage `drop`: remove the k blocks of least influence (ShortGPT), the static baseline of layer routes."""

from __future__ import annotations

from ..method import CostState, Method, knobs
from .config import DropConfig
from .plan import DropPlan


class Drop(Method):
    name = "drop"
    config = DropConfig
    plan = DropPlan
    baked = True  # removed blocks stay removed in the exported weights

    def check(self, model, config, where):
        from .apply import check

        check(model, config, where)

    def needs_calibration(self, config):
        return True  # block influence is measured on calibration text

    def fit(self, ctx, config):
        from .apply import fit

        return fit(ctx, config)

    def apply(self, model, plan, tensors):
        from .apply import apply

        apply(model, plan, tensors)

    def search_knobs(self, num_layers):
        return knobs(blocks={"low": 1, "high": max(1, num_layers // 2)})

    def cost(self, config, plan, metrics, state: CostState):
        state.remove(len(plan.removed) if plan else config.count(state.layers))

    def contract_config(self):
        return {"blocks": 1}
