"""Cost model against hand-computed values on the tiny test config, budget parsing, Pareto front."""

import pytest

from adaflex.search.cost import Setting, Shape, cost, feasible, pareto_front, parse_budget, violations
from adaflex.search.space import Knob, corner_points
from tiny import tiny_llama

# tests/tiny.py's model: 4 blocks, hidden 64, MLP 160, 4 heads of 16, 2 KV heads, vocab 259
TINY = Shape(
    num_layers=4, hidden_size=64, intermediate_size=160, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=259
)
# block linears: q, o 64*64 each; k, v 64*32 each; gate, up, down 64*160 each
BLOCK = 2 * 4096 + 2 * 2048 + 3 * 10240  # 43008
HEAD = 64 * 259  # 16576
C = 100
ATTN = 2 * 4 * 16 * C  # 12800: scores and weighted sum over 100 keys
DENSE = 4 * (BLOCK + ATTN) + HEAD  # 239808


def test_shape_from_config_matches_hand_count():
    shape = Shape.from_config(tiny_llama().config)
    assert shape == TINY
    assert shape.block_macs == BLOCK == 43008
    assert shape.head_macs == HEAD
    assert shape.params == 4 * BLOCK + HEAD


def test_dense_is_one():
    c = cost(TINY, Setting(), C)
    assert c.macs_per_token == c.dense_macs_per_token == DENSE == 239808
    assert (c.flops_ratio, c.kv_ratio, c.params_ratio, c.weights_ratio) == (1.0, 1.0, 0.0, 1.0)


def test_removed_block():
    c = cost(TINY, Setting(removed_blocks=1), C)
    assert c.macs_per_token == 3 * (BLOCK + ATTN) + HEAD == 184000
    assert c.flops_ratio == pytest.approx(184000 / 239808)
    assert c.kv_ratio == pytest.approx(0.75)
    assert c.weights_ratio == pytest.approx(0.75)


def test_kv_budget_cuts_attention_and_bytes():
    c = cost(TINY, Setting(kv_fraction=0.25), C)
    assert c.macs_per_token == 4 * (BLOCK + ATTN / 4) + HEAD == 201408
    assert c.flops_ratio == pytest.approx(201408 / 239808)
    assert c.kv_ratio == pytest.approx(0.25)
    assert c.kv_bytes == pytest.approx(4 * 25 * 2 * 2 * 16 * 4)  # blocks * kept tokens * (k, v) * heads * dim * fp32


def test_routes_with_kv():
    c = cost(TINY, Setting(executed=2.5, kv_fraction=0.5), C)
    assert c.macs_per_token == pytest.approx(2.5 * (BLOCK + ATTN / 2) + HEAD)  # 140096
    assert c.flops_ratio == pytest.approx(140096 / 239808)
    assert c.kv_ratio == pytest.approx(2.5 * 0.5 / 4)  # skipped blocks hold no KV


def test_repeats_cost_more_than_dense():
    assert cost(TINY, Setting(executed=5), C).flops_ratio == pytest.approx((5 * (BLOCK + ATTN) + HEAD) / DENSE)


def test_sparsity_reported_not_counted_unless_a_kernel_runs_2_4():
    unstructured = cost(TINY, Setting(sparsity=0.5), C)
    assert unstructured.flops_ratio == 1.0 and unstructured.counted_sparsity == 0.0
    assert unstructured.sparsity == 0.5 and unstructured.weights_ratio == 0.5
    semi = cost(TINY, Setting(sparsity=0.5, pattern="2:4"), C)
    assert semi.flops_ratio == 1.0  # no kernel flagged (CPU)
    kernel = cost(TINY, Setting(sparsity=0.5, pattern="2:4", sparse_kernel=True), C)
    assert kernel.macs_per_token == 4 * (BLOCK / 2 + ATTN) + HEAD == 153792
    unstructured_kernel = cost(TINY, Setting(sparsity=0.5, sparse_kernel=True), C)
    assert unstructured_kernel.flops_ratio == 1.0  # the flag only applies to 2:4


def test_adapters():
    per_rank = (64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 160) * 3  # q, k, v, o, gate, up, down
    assert per_rank == 1120
    c = cost(TINY, Setting(adapter_params=8960, adapter_macs=4 * per_rank), C)
    assert c.params_ratio == pytest.approx(8960 / (4 * BLOCK + HEAD))
    assert c.macs_per_token == 4 * (BLOCK + 4480 + ATTN) + HEAD == 257728


def test_int8_storage_counts_bytes():
    c = cost(TINY, Setting(kv_fraction=1.0, kv_bytes_per_value=1.25), C)  # int8 + one fp32 scale per 16 values
    assert c.kv_ratio == pytest.approx(1.25 / 4)
    assert c.flops_ratio == 1.0


def test_bad_settings():
    with pytest.raises(ValueError):
        cost(TINY, Setting(removed_blocks=4), C)
    with pytest.raises(ValueError):
        cost(TINY, Setting(kv_fraction=1.5), C)


@pytest.mark.parametrize(
    "spec,want",
    [
        ("0.6", {"flops": 0.6}),
        ("flops=0.6,kv=0.25,params=0.02", {"flops": 0.6, "kv": 0.25, "params": 0.02}),
        (" kv = 0.5 ", {"kv": 0.5}),
        ("1", {"flops": 1.0}),
    ],
)
def test_parse_budget(spec, want):
    assert parse_budget(spec) == want


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("", "neither"),
        ("1.5", "(0, 1]"),
        ("flops=0", "(0, 1]"),
        ("speed=0.5", "unknown axis 'speed'"),
        ("flops=0.5,flops=0.6", "twice"),
        ("flops=abc", "not a number"),
        ("flops", "neither"),
        ("-0.5", "neither"),
    ],
)
def test_parse_budget_errors(spec, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        parse_budget(spec)


def test_violations_and_feasible():
    c = cost(TINY, Setting(kv_fraction=0.25), C)
    v = violations(c, {"flops": 0.9, "kv": 0.2})
    assert v[0] == pytest.approx(201408 / 239808 - 0.9) and v[1] == pytest.approx(0.05)
    assert not feasible(c, {"flops": 0.9, "kv": 0.2})
    assert feasible(c, {"flops": 0.9, "kv": 0.25})
    assert feasible(c.to_dict(), {"kv": 0.3})


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 3.0), (2.5, 1.0), (1.0, 6.0), (4.0, 0.5)]
    assert pareto_front(pts) == [0, 1, 3, 5]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # ties dominate neither


def test_knobs():
    assert Knob.of(0.5) is None
    k = Knob.of({"low": 2, "high": 6})
    assert k.integer and k.corners() == [2, 6] and k.clip(9) == 6 and k.clip(3.4) == 3
    f = Knob.of({"low": 0.1, "high": 0.5})
    assert not f.integer and f.clip(0.05) == 0.1
    c = Knob.of(["uniform", "owl"])
    assert c.corners() == ["uniform", "owl"] and c.clip("dp") == "uniform"
    with pytest.raises(ValueError):
        Knob.of({"low": 3, "high": 1})
    with pytest.raises(ValueError):
        Knob.of({"low": 1})
    with pytest.raises(ValueError):
        Knob.of([])
    pts = corner_points({"a": k, "b": c})
    assert len(pts) == 4 and {"a": 6, "b": "owl"} in pts
    assert corner_points({"a": k, "b": c}, limit=3) is None


def test_knob_suggest_uses_the_trial():
    import optuna

    study = optuna.create_study()
    trial = study.ask()
    assert Knob.of({"low": 2, "high": 6}).suggest(trial, "x") in range(2, 7)
    assert 0.1 <= Knob.of({"low": 0.1, "high": 0.5}).suggest(trial, "y") <= 0.5
    assert Knob.of(["a", "b"]).suggest(trial, "z") in ("a", "b")
    assert isinstance(trial.distributions["x"], optuna.distributions.IntDistribution)
