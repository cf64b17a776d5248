"""Stage `heal`: distil the retrofitted model back towards the dense one, last in the recipe, with every
earlier decision active (removed blocks, pruning masks, routes). It trains what the recipe names: adapters
(the `shards` stage's LoRA or MoS), norms, the LM head, the last k blocks, and LLM-Streamline replacements
of removed runs of blocks. See retrofit/heal/README.md."""

from __future__ import annotations

import math

from ..method import CostState, Method
from .config import HealConfig, check_last
from .plan import HealPlan


class Heal(Method):
    name = "heal"
    config = HealConfig
    plan = HealPlan
    baked = False  # replacements and adapters on pruned linears are re-installed on load

    def check(self, model, config, where):
        from .apply import check

        check(model, config, where)

    def check_recipe(self, config, index, methods, where):
        check_last(index, methods, where)

    def needs_calibration(self, config):
        return True  # it heals on the calibration windows

    def fit(self, ctx, config):
        from .apply import fit

        return fit(ctx, config)

    def apply(self, model, plan, tensors):
        from .apply import apply

        apply(model, plan, tensors)

    def export_extra(self, model, plan, tensors, out_dir, merge):
        from .apply import export_extra

        return export_extra(model, plan, tensors, out_dir, merge)

    def cost(self, config, plan, metrics, state: CostState):
        # Merged adapters and retrained weights cost nothing at inference; adapters left unmerged on pruned
        # linears and the replacements do. Predicted (no plan): adapters stay unmerged when anything is
        # pruned, and one replacement stands for the removed blocks.
        d = state.shape.hidden_size
        unmerged_macs = None
        if plan is not None:
            from ..shards.plan import rank_macs

            a = plan.adapter
            # a 3-D experts target holds one LoRA per expert; a token passes top_k of them (rank_macs)
            per_rank = {t: sum(dims) * (a.experts or {}).get(t, [1])[0] for t, dims in a.shapes.items()} if a else {}
            macs = rank_macs(a.shapes, a.experts) if a else {}

            def of(table, n):  # a target names a module (or a 3-D parameter) by its path's end
                return next(v for t, v in table.items() if n.endswith(f".{t}")) * a.rank
            unmerged = sum(of(per_rank, n) for n in plan.unmerged) if a else 0
            unmerged_macs = sum(of(macs, n) for n in plan.unmerged) if a else 0
            reps = len(plan.replacements)
            rank = plan.replacement_rank
        else:
            from ..shards import predicted_dims

            a_on = "adapters" in config.train and state.sparsity > 0
            dims = predicted_dims(state.shape, config.adapter, "heal.adapter") if a_on else {}
            unmerged = state.layers * config.adapter.rank * sum(sum(d) for d in dims.values())
            reps = 1 if "replacements" in config.train and state.removed else 0
            rank = config.replacement_rank
        rep = reps * 2 * d * rank
        state.adapter_params += unmerged + rep
        unmerged_macs = unmerged if unmerged_macs is None else unmerged_macs
        state.adapter_macs += math.ceil((unmerged_macs + rep) / max(1, state.layers))

    def contract_config(self):
        # alone in a recipe the model is its own dense teacher (KL 0, no gradient): next-token loss moves it
        return {"train": ["adapters", "norms"], "loss": "lm", "tokens": 256, "batch_size": 2, "lr": 0.05,
                "weights_lr": 0.01, "adapter": {"method": "mos", "rank": 4, "equivalent_rank": 2,
                                                "shards_per_vector": 4}}
