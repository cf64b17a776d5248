"""Shard-adapter configuration search on toy objectives (no model)."""

from __future__ import annotations

import pytest

from adaflex.search.errors import InfeasibleBudget
from adaflex.search.shards_space import ShardsSpace, feasibility, params, search_shards, valid_configs

SMOL = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
        "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
ALL = list(SMOL)


def test_shards_space_params_and_constraints():
    space = ShardsSpace(num_layers=30, shapes=SMOL)
    c = {"rank": 8, "equivalent_rank": 1, "shards_per_vector": 4, "private_rank": 0, "targets": ALL}
    assert params(c, space) == 305_280  # methods.md: one unit of rank on SmolLM2-135M
    assert feasibility(c, space) is None
    assert "divide" in feasibility({**c, "shards_per_vector": 5}, space)
    assert "private" in feasibility({**c, "private_rank": 2}, space)
    assert "without replacement" in feasibility({**c, "rank": 64, "equivalent_rank": 1},
                                                ShardsSpace(num_layers=30, shapes=SMOL, ranks=(64,)))
    assert max(space.l_choices()) == 16 and all(192 % k == 0 for k in space.l_choices())


def test_shards_search_finds_best_under_budget():
    space = ShardsSpace(num_layers=30, shapes=SMOL, ranks=(4, 8, 16), equivalent_ranks=(1, 2, 4),
                        shards_per_vector=(1, 2, 4), private_ranks=(0, 1))
    budget = 2 * 305_280
    calls = []

    def objective(c):
        calls.append(c)
        assert params(c, space) <= budget and feasibility(c, space) is None
        return loss(c)

    def loss(c):  # falls with rank and budget, prefers all targets and l = 4
        return 10 / c["rank"] + 1 / c["equivalent_rank"] + (0 if len(c["targets"]) == 7 else 1) \
            + abs(c["shards_per_vector"] - 4) * 0.1 + 0.05 * c["private_rank"]

    res = search_shards(objective, space, budget, trials=25, seed=0)
    best = res["best"]
    assert res["trials"]["evaluated"] == len(calls) <= 25
    assert len({repr(sorted(c.items())) for c in calls}) == len(calls)  # each configuration trained once
    assert best["params"] <= budget
    assert best["equivalent_rank"] == 2 and len(best["targets"]) == 7 and best["rank"] >= 8
    assert best["loss"] == min(loss(c) for c in calls)


def test_shards_search_infeasible_budget():
    space = ShardsSpace(num_layers=30, shapes=SMOL)
    with pytest.raises(InfeasibleBudget) as e:
        search_shards(lambda c: 0.0, space, budget_params=1000)
    assert e.value.cheapest == min(params(c, space) for c in valid_configs(space))
    assert e.value.exit_code == 3
