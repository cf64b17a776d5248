"""The search's predicted adapter cost on any family (issue 26): the `Shape` carries the linears measured from the
modules (retrofit/arch/reference.py `search_shape`), so a shards or heal prediction (no plan yet) resolves the
targets as a run does and counts the parameters the run's adapters really have; Llama's is unchanged."""

from __future__ import annotations

import pytest

from adaflex.retrofit.arch import search_shape
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.heal.config import HealConfig
from adaflex.retrofit.shards import predicted_dims
from adaflex.retrofit.shards.apply import init_tensors, install, make_plan, remove_all
from adaflex.retrofit.shards.config import ShardsConfig
from adaflex.search.cost import Shape
from adaflex.study.cost import setting_of
from tiny import FAMILIES, tiny_family

LORA = {"method": "lora", "rank": 4}
MOS = {"method": "mos", "rank": 4, "equivalent_rank": 2, "shards_per_vector": 4}


def _installed_params(model, plan) -> int:
    install(model, plan, init_tensors(plan, 0))
    try:
        return sum(p.numel() for n, p in model.named_parameters() if "adaflex" in n)
    finally:
        remove_all(model)


@pytest.mark.parametrize("family, settings", [
    *[(f, LORA) for f in FAMILIES],  # targets unset: Llama's seven, else the family's roles
    ("opt", {**LORA, "targets": ["out_proj", "fc1"]}), ("gpt2", {**LORA, "targets": ["c_attn", "mlp.c_proj"]}),
    ("gpt_neox", {**MOS, "targets": ["query_key_value", "dense_4h_to_h"]}),
])
def test_predicted_adapters_cost_what_a_run_installs(family, settings, one_thread):
    model, _ = tiny_family(family)
    shape = search_shape(model)
    cfg = ShardsConfig(**settings)
    predicted = setting_of([("shards", cfg, None, {})], shape, 64)
    plan = make_plan(model, cfg)
    measured = setting_of([("shards", cfg, plan, {})], shape, 64)
    assert predicted_dims(shape, cfg) == {t: tuple(d) for t, d in plan.shapes.items()}
    assert predicted.adapter_params == measured.adapter_params == _installed_params(model, plan) > 0
    assert predicted.adapter_macs == measured.adapter_macs


def test_heal_predicts_its_adapters_on_another_family(one_thread):
    model, _ = tiny_family("gpt2")
    heal = HealConfig(train=["adapters"], adapter=LORA)
    plan = make_plan(model, heal.adapter, "heal.adapter")
    assert predicted_dims(search_shape(model), heal.adapter, "heal.adapter") == \
        {t: tuple(d) for t, d in plan.shapes.items()}


def test_a_target_the_blocks_lack_is_refused_in_one_line(one_thread):
    model, _ = tiny_family("opt")
    with pytest.raises(UsageError, match=r"^shards.targets: 'o_proj' names 0 linears of a decoder block, not one "
                                         r"\(its blocks' linears: fc1, fc2, k_proj, out_proj, q_proj, v_proj\)$"):
        predicted_dims(search_shape(model), ShardsConfig(targets=["o_proj"], **LORA))


def test_a_prediction_naming_expert_parameters_is_refused_in_one_line(one_thread):
    # a per-expert LoRA's cost needs the experts' count and top-k, which the Shape does not carry: a run measures it
    model, _ = tiny_family("mixtral")
    with pytest.raises(UsageError, match=r"^shards.targets: the predicted cost does not count adapters on the 3-D "
                                         r"experts \('experts.down_proj'\); run the recipe to measure it$"):
        predicted_dims(search_shape(model), ShardsConfig(targets=["q_proj", "experts.down_proj"], **LORA))


@pytest.mark.parametrize("settings", [LORA, {**LORA, "targets": ["q", "down"]}, MOS])
def test_a_llama_prediction_is_unchanged(settings, one_thread):
    """The measured Shape predicts what the config formula did on a Llama block (regression)."""
    model, _ = tiny_family("llama")
    cfg = ShardsConfig(**settings)
    measured, formula = search_shape(model), Shape.from_config(model.config)
    assert predicted_dims(measured, cfg) == predicted_dims(formula, cfg)
    a, b = (setting_of([("shards", cfg, None, {})], s, 64) for s in (measured, formula))
    assert (a.adapter_params, a.adapter_macs) == (b.adapter_params, b.adapter_macs)


def test_configs_without_intermediate_size_give_a_shape(one_thread):
    """GPT-2 and OPT name their MLP width otherwise (n_inner unset, ffn_dim): the measured Shape still counts."""
    for family, c_fc in (("gpt2", ("mlp.c_fc", 64, 256)), ("opt", ("fc1", 64, 128))):
        model, _ = tiny_family(family)
        assert not isinstance(getattr(model.config, "intermediate_size", None), int)
        shape = search_shape(model)
        assert c_fc in shape.linears and shape.measured_block_macs > 0
