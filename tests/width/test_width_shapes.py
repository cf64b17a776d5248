"""Widths and MACs (pure): GQA-valid head options, FFN levels, the uniform width and explicit widths."""

from __future__ import annotations

import pytest

from adaflex.retrofit.width.shapes import BlockWidth, Dims, attn_options, explicit_width, mlp_options, uniform_width

SMOL = Dims(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)


def test_block_macs_match_the_dense_reference_formula():
    d, hd = 576, 64
    assert SMOL.block_macs == d * 9 * hd * 2 + 2 * d * 3 * hd + 3 * d * 1536


def test_attention_options_keep_gqa_groups_even():
    opts = attn_options(SMOL, kv_groups=False)
    assert opts == [(3, 3), (3, 2), (3, 1)]  # whole groups stay; every group keeps the same count
    both = attn_options(SMOL, kv_groups=True)
    assert len(both) == 9 and both[0] == (3, 3)
    macs = [SMOL.attn_macs(*gr) for gr in both]
    assert macs == sorted(macs, reverse=True)


def test_mlp_options_are_multiples_and_include_the_extra_width():
    opts = mlp_options(SMOL, levels=10, max_removed=0.9, multiple=32, extra=(1000,))
    assert opts[0] == 1536 and 1000 in opts
    assert all(c % 32 == 0 for c in opts if c != 1000)
    assert min(opts) >= 1536 * 0.1 - 32


@pytest.mark.parametrize("fraction", [0.15, 0.25, 0.35])
def test_uniform_width_removes_at_least_the_target_and_little_more(fraction):
    w = uniform_width(SMOL, fraction, "both", False, 32)
    removed = 1 - SMOL.macs(w) / SMOL.block_macs
    assert fraction <= removed < fraction + 3 * 576 * 32 / SMOL.block_macs
    assert 1 - SMOL.attn_macs(w.kv_groups, w.per_group) / SMOL.attn_macs(3, 3) <= fraction


def test_uniform_width_mlp_only_keeps_every_head():
    w = uniform_width(SMOL, 0.25, "mlp", False, 32)
    assert (w.kv_groups, w.per_group) == (3, 3) and w.channels < 1536


@pytest.mark.parametrize("args, key", [
    ((None, 5, None), "num_heads"),      # 5 query heads over 3 KV heads: GQA broken
    ((None, 4, 2), None),                # 2 groups of 2 heads: valid
    ((2000, None, None), "intermediate_size"),
    ((None, 8, 4), "num_kv_heads"),      # 4 KV heads, the model has 3
    ((None, 8, 2), "num_heads"),         # 4 per group, the model has 3
])
def test_explicit_widths(args, key):
    w, why = explicit_width(SMOL, *args)
    if key is None:
        assert why is None and w == BlockWidth(1536, 2, 2)
    else:
        assert why is not None and why.startswith(key + ":")


def test_cost_rule_multiplies_the_kept_share_of_block_macs():
    from adaflex.retrofit.method import CostState
    from adaflex.retrofit.width import Width
    from adaflex.retrofit.width.config import WidthConfig
    from adaflex.retrofit.width.plan import WidthPlan
    from adaflex.search.cost import Shape

    shape = Shape(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                  vocab_size=49152)
    method = Width()
    st = CostState(shape, context=256)
    plan = WidthPlan.model_construct(block_macs_kept=60, block_macs_dense=100)  # the cost rule's keys alone
    method.cost(WidthConfig(fraction=0.25), plan, {}, st)
    assert st.block_macs_fraction == 0.6  # measured from the plan
    st = CostState(shape, context=256)
    method.cost(WidthConfig(fraction=0.25), None, {}, st)
    assert st.block_macs_fraction == 0.75  # predicted: the whole fraction
    st = CostState(shape, context=256)
    method.cost(WidthConfig(allocation="uniform", intermediate_size=768, num_heads=6), None, {}, st)
    assert st.block_macs_fraction == SMOL.macs(BlockWidth(768, 3, 2)) / SMOL.block_macs
    assert set(method.search_knobs(30)) == {"fraction", "allocation"}


def test_two_matrix_mlp_counts_two_matrices_per_channel():
    """OPT / GPT-NeoX / GPT-2: a channel costs up row + down column (2·d), so a uniform fraction keeps more of
    them than on a gated MLP, and the predicted cost of explicit widths reads the MLP's matrices from the measured
    roles."""
    from dataclasses import replace

    from adaflex.retrofit.method import CostState
    from adaflex.retrofit.width import Width
    from adaflex.retrofit.width.config import WidthConfig
    from adaflex.search.cost import Shape

    two = replace(SMOL, mlp_matrices=2)
    assert two.mlp_macs(100) == 2 * 576 * 100 and two.block_macs < SMOL.block_macs
    w = uniform_width(two, 0.2, "mlp", False, 32)
    assert two.macs(w) <= 0.8 * two.block_macs < two.macs(BlockWidth(w.channels + 32, 3, 3))
    attn = SMOL.attn_macs(3, 3)
    shape = Shape(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64,
                  vocab_size=49152, measured_block_macs=attn + 2 * 576 * 1536,
                  roles=(("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                         ("o", "self_attn.out_proj"), ("up", "fc1"), ("down", "fc2")))  # OPT's roles
    st = CostState(shape, context=256)
    Width().cost(WidthConfig(allocation="uniform", intermediate_size=768), None, {}, st)
    assert st.block_macs_fraction == two.macs(BlockWidth(768, 3, 3)) / two.block_macs
