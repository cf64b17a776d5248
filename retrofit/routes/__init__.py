"""Stage `routes`: per-example layer routes (Dr.LLM supervision, FiRST-style prefill decisions).

MCTS over execution paths labels examples (skip / execute / repeat once per block); one tiny router per
block is trained on those labels with teacher forcing; at run time the routers read the prompt once at
prefill, fix each sequence's path for every decoding step, and blocks run only on the rows that take
them (skipped blocks cost nothing; a repeated block keeps its own cache slot).
"""

from __future__ import annotations

from ..method import CostState, Method, knobs
from .config import RoutesConfig
from .plan import RoutesPlan


class Routes(Method):
    name = "routes"
    config = RoutesConfig
    plan = RoutesPlan
    baked = False  # routers are re-attached at load time; the exported weights stay dense

    def check(self, model, config, where):
        from .apply import check

        check(model, config, where)

    def fit(self, ctx, config):
        from .apply import fit

        return fit(ctx, config)

    def apply(self, model, plan, tensors):
        from .apply import apply

        apply(model, plan, tensors)

    def data_keys(self, config):
        return [(f"train.{j}", value) for j, value in enumerate(config.train)]

    def search_knobs(self, num_layers):
        return knobs(max_executed={"low": max(1, (num_layers + 1) // 2), "high": num_layers})

    def cost(self, config, plan, metrics, state: CostState):
        if plan and plan.policy == "path":
            state.executed = float(len(plan.path))
        elif plan and metrics.get("calibrated_executed_mean") is not None:
            state.executed = float(metrics["calibrated_executed_mean"])
        else:  # the whole allowance
            state.executed = float(min(config.max_executed or state.layers, state.layers))

    def contract_config(self):
        return {"max_executed": 3, "simulations": 4, "examples": 4, "text_len": 32, "epochs": 2, "batch_size": 4,
                "min_fix_share": 0.0, "calibrate_examples": 2}
