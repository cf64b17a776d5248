"""Stage `prune`: layer-adaptive weight sparsity (uniform, OWL, or a DP over measured distortion curves),
magnitude or Wanda scores, unstructured or N:M patterns; may also drop whole blocks (depth option)."""

from __future__ import annotations

import math

from ..method import CostState, Method, knobs
from .config import PruneConfig, needs_calibration
from .plan import PrunePlan


class Prune(Method):
    name = "prune"
    config = PruneConfig
    plan = PrunePlan
    baked = True  # the masks (and removed blocks) live in the exported weights
    reuses_state = True  # the distortion-curve cache checks the model, data and settings itself

    def check(self, model, config, where):
        from .apply import check

        check(model, config, where)

    def needs_calibration(self, config):
        return needs_calibration(config)

    def fit(self, ctx, config):
        from .apply import fit

        return fit(ctx, config)

    def apply(self, model, plan, tensors):
        from .apply import apply

        apply(model, plan, tensors)

    def search_knobs(self, num_layers):
        return knobs(sparsity={"low": 0.1, "high": 0.6}, allocation=["uniform", "owl", "dp"])

    def cost(self, config, plan, metrics, state: CostState):
        if plan:
            k = len(plan.removed)
            kept = [e for e in plan.linears if not e.removed]
            n = sum(math.prod(e.shape) for e in kept)
            state.sparsity = sum(e.sparsity * math.prod(e.shape) for e in kept) / max(1, n)
        else:  # the whole allowance: a pruning that may drop blocks drops as many as its sparsity allows
            nm = config.nm
            s = (nm[1] - nm[0]) / nm[1] if nm and config.allocation == "uniform" else config.sparsity
            k = min(state.layers - 1, int(math.floor(s * state.layers + 1e-9))) if config.allow_drop else 0
            state.sparsity = 0.0 if config.allow_drop else s
        state.pattern = config.pattern
        state.remove(k)

    def contract_config(self):
        return {"sparsity": 0.5, "allocation": "owl", "score": "wanda"}
