"""Stage `width`: layer-adaptive structured pruning of FFN channels and attention heads (GQA-aware); the
blocks' linears become physically smaller (retrofit/width/README.md)."""

from __future__ import annotations

from dataclasses import replace

from ..method import CostState, Method, knobs
from .config import WidthConfig
from .plan import WidthPlan


def _impl():
    """The torch code, imported only when a hook runs (validating a recipe stays cheap)."""
    from . import apply

    return apply


class Width(Method):
    name = "width"
    config = WidthConfig
    plan = WidthPlan
    baked = False  # uniform widths are baked per export (export_extra says so); per-block ones re-applied

    def check(self, model, config, where):
        _impl().check(model, config, where)

    def needs_calibration(self, config):
        return True  # importance is measured on calibration text

    def fit(self, ctx, config):
        return _impl().fit(ctx, config)

    def apply(self, model, plan, tensors):
        _impl().apply(model, plan, tensors)

    def export_extra(self, model, plan, tensors, out_dir, merge):
        return _impl().export_extra(model, plan, tensors, out_dir, merge)

    def search_knobs(self, num_layers):
        return knobs(fraction={"low": 0.1, "high": 0.4}, allocation=["uniform", "dp"])

    def cost(self, config, plan, metrics, state: CostState):
        """The share of the (remaining) blocks' linear MACs kept: measured from the plan, else predicted
        (the whole fraction removed, or the explicit uniform width's MACs)."""
        if plan:
            kept = plan.block_macs_kept / plan.block_macs_dense
        elif config.fraction is not None:
            kept = 1 - config.fraction
        else:
            from .shapes import Dims, explicit_width

            s = state.shape
            dims = Dims(s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.head_dim)
            roles = dict(s.roles)  # measured from the modules; () from a config: Llama's gated MLP
            if roles and not {"gate", "gate_up"} & roles.keys():  # a two-matrix MLP (OPT, GPT-NeoX, GPT-2)
                dims = replace(dims, mlp_matrices=2)
            w, _ = explicit_width(dims, config.intermediate_size, config.num_heads, config.num_kv_heads)
            kept = dims.macs(w) / dims.block_macs
        state.block_macs_fraction *= kept

    def contract_config(self):
        return {"fraction": 0.3, "allocation": "dp", "channel_multiple": 16, "levels": 4, "curve_samples": 2,
                "kv_groups": True}
