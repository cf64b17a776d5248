"""Stage `shards`: heal a retrofitted model with Mixture-of-Shards adapters (MoS) or plain LoRA.

MoS (ICLR 2025) keeps one A pool and one B pool per projection type, shared by all layers; each layer
assembles a rank-r LoRA from the pools through fixed index vectors, so r-rank adapters cost the
parameters of a rank-e LoRA. Trained by distillation from the dense model; exported as plain peft LoRA.
"""

from __future__ import annotations

from ..method import CostState, Method, knobs
from .config import ShardsConfig
from .plan import ShardsPlan
from .targets import predicted_dims, target_dims

__all__ = ["Shards", "predicted_dims", "target_dims"]


class Shards(Method):
    name = "shards"
    config = ShardsConfig
    plan = ShardsPlan
    baked = False  # adapters are re-installed on load unless the export merged them (export_extra says so)

    def check(self, model, config, where):
        from .apply import check

        check(model, config, where)

    def needs_calibration(self, config):
        return True  # the adapters heal on calibration text

    def fit(self, ctx, config):
        from .apply import fit

        return fit(ctx, config)

    def apply(self, model, plan, tensors):
        from .apply import apply

        apply(model, plan, tensors)

    def export_extra(self, model, plan, tensors, out_dir, merge):
        from .apply import export_extra

        return export_extra(model, plan, tensors, out_dir, merge)

    def search_knobs(self, num_layers):
        return knobs(rank=[4, 8, 16])

    def cost(self, config, plan, metrics, state: CostState):
        dims = plan.shapes if plan else predicted_dims(state.shape, config)
        per_rank = sum(a + b for a, b in dims.values())
        rank_params = config.equivalent_rank if config.method == "mos" else config.rank
        state.adapter_params = plan.trainable_params if plan else rank_params * state.layers * per_rank
        if plan and plan.block_shapes:  # per-block shapes: the mean block's adapter MACs
            per_rank = round(sum(a + b for dims in plan.block_shapes.values() for a, b in dims) / plan.num_layers)
        elif plan:  # a 3-D experts target: the top_k experts a token passes (rank_macs), not all of them
            from .plan import rank_macs

            per_rank = sum(rank_macs(plan.shapes, plan.experts).values())
        state.adapter_macs = config.rank * per_rank

    def contract_config(self):
        return {"method": "mos", "rank": 4, "equivalent_rank": 2, "shards_per_vector": 4, "steps": 2,
                "batch_size": 2, "lr": 0.05}
