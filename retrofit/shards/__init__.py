"""Stage `shards`: heal a retrofitted model with Mixture-of-Shards adapters (MoS) or plain LoRA.

MoS (ICLR 2025) keeps one A pool and one B pool per projection type, shared by all layers; each layer
assembles a rank-r LoRA from the pools through fixed index vectors, so r-rank adapters cost the
parameters of a rank-e LoRA. Trained by distillation from the dense model; exported as plain peft LoRA.
"""

from __future__ import annotations

from ..method import CostState, Method, knobs
from .config import ShardsConfig
from .plan import ShardsPlan


def target_dims(shape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each adaptable linear of a Llama-style block of the cost model's `shape`."""
    d, m = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}


def predicted_dims(shape, targets, where: str = "shards") -> dict[str, tuple[int, int]]:
    """`target_dims` of the targets a prediction (no plan yet) names; the cost model's `Shape` is Llama's, so another
    family's projection is refused in one line (a run's plan measures every target)."""
    dims = target_dims(shape)
    other = [t for t in targets if t not in dims]
    if other:
        from ..errors import UsageError

        raise UsageError(f"{where}.targets: the predicted cost (search/cost.py Shape) knows Llama's projections, "
                         f"not '{other[0]}'; run the recipe to measure it")
    return {t: dims[t] for t in targets}


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
        dims = plan.shapes if plan else predicted_dims(state.shape, config.targets)
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
