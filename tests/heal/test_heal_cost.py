"""heal's cost rule: merged adapters and retrained weights are free; unmerged adapters and replacements count."""

from __future__ import annotations

from adaflex.retrofit import registry
from adaflex.retrofit.heal.config import HealConfig
from adaflex.retrofit.heal.plan import HealPlan, Run
from adaflex.retrofit.method import CostState
from adaflex.retrofit.shards.plan import ShardsPlan
from adaflex.search.cost import Shape

SHAPE = Shape(num_layers=4, hidden_size=64, intermediate_size=160, num_heads=4, num_kv_heads=2, head_dim=16,
              vocab_size=259)


def _state(**kw) -> CostState:
    return CostState(shape=SHAPE, context=512, **kw)


def test_cost_from_the_plan():
    heal = registry.get("heal")
    # the cost rule's keys alone (model_construct: no validation of the rest)
    adapter = ShardsPlan.model_construct(rank=4, shapes={"q_proj": [64, 64], "down_proj": [160, 64]})
    plan = HealPlan.model_construct(adapter=adapter,
                                    unmerged=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
                                    replacements=[Run(after=1, blocks=[2])], replacement_rank=8)
    s = _state()
    s.remove(1)
    heal.cost(HealConfig(), plan, {}, s)
    expected = 4 * (64 + 64) + 4 * (160 + 64) + 2 * 64 * 8
    assert s.adapter_params == expected
    assert s.adapter_macs == -(-expected // 3)  # per executed block, 3 blocks left
    merged = _state()
    heal.cost(HealConfig(), plan.model_copy(update={"unmerged": [], "replacements": []}), {}, merged)
    assert merged.adapter_params == merged.adapter_macs == 0


def test_predicted_cost_counts_adapters_only_when_something_is_pruned():
    heal, cfg = registry.get("heal"), HealConfig(train=["adapters", "replacements"])
    dense = _state()
    heal.cost(cfg, None, {}, dense)
    assert dense.adapter_macs == 0
    pruned = _state(sparsity=0.5)
    pruned.remove(1)
    heal.cost(cfg, None, {}, pruned)
    assert pruned.adapter_macs > 0 and pruned.adapter_params > 2 * 64 * cfg.replacement_rank


def test_unmerged_expert_adapters_count_every_expert_and_top_k_macs():
    heal = registry.get("heal")
    # a 3-D experts target: one rank-4 LoRA per expert (4 experts), a token passes 2 of them (shards/plan.py)
    adapter = ShardsPlan.model_construct(rank=4, shapes={"experts.down_proj": [96, 64]},
                                         experts={"experts.down_proj": [4, 2]})
    plan = HealPlan.model_construct(adapter=adapter, unmerged=["model.layers.0.mlp.experts.down_proj"],
                                    replacements=[], replacement_rank=8)
    s = _state()
    heal.cost(HealConfig(), plan, {}, s)
    assert s.adapter_params == 4 * 4 * (96 + 64)
    assert s.adapter_macs == -(-(2 * 4 * (96 + 64)) // 4)  # top_k experts a token, per executed block (4 left)
