"""Stage `kv`: per-layer KV-cache budgets (uniform, PyramidKV, CAKE, PrefixKV, searched) with selection
policies (StreamingLLM, SnapKV, CAKE indicator, H2O, mix) in a cache that really holds fewer bytes."""

from __future__ import annotations

from ..method import CostState, Method, knobs
from .config import KVConfig, needs_calibration
from .plan import KVPlan


class KV(Method):
    name = "kv"
    config = KVConfig
    plan = KVPlan
    baked = False  # the plan is re-applied on load from the export's config block

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
        return knobs(budget={"low": 0.2, "high": 1.0}, allocation=["uniform", "pyramid", "cake"])

    def cost(self, config, plan, metrics, state: CostState):
        import torch

        from .spec import storage_bytes_per_value

        dense = {4.0: torch.float32, 2.0: torch.bfloat16}.get(state.model_bytes, torch.float32)
        rel = storage_bytes_per_value(config.storage, dense, state.shape.head_dim)
        byte_budget = config.budget if config.tokens is None else min(1.0, config.tokens / state.context) * rel
        state.kv_fraction = min(1.0, byte_budget / rel)
        state.kv_bytes_per_value = state.shape.bytes_per_value * rel

    def contract_config(self):
        return {"budget": 0.5, "allocation": "pyramid", "policy": "snapkv", "sinks": 2, "window": 8, "kernel": 3}
