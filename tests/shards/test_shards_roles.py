"""shards targets by role (issue 26): the fused and family projections the architecture adapter maps (Phi-3's
`qkv_proj`, GPT-NeoX's `query_key_value`, OPT's `out_proj`/`fc1`/`fc2`, GPT-2's `Conv1D`), the family's roles as
the default where Llama's names are missing, and peft's `fan_in_fan_out` for Conv1D."""

from __future__ import annotations

import json

import pytest
import torch

from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.shards.apply import init_tensors, install, make_plan, write_peft_lora
from adaflex.retrofit.shards.config import ShardsConfig
from adaflex.retrofit.shards.layer import merge_all
from tiny import tiny_family

LORA = {"method": "lora", "rank": 4}


def _trained(model, plan):
    """Install the adapters with nonzero B, so that ΔW changes the output."""
    tensors = init_tensors(plan, 0)
    g = torch.Generator().manual_seed(1)
    for k, t in tensors.items():
        if k.endswith(".b"):
            tensors[k] = torch.randn(t.shape, generator=g) * 0.1
    install(model, plan, tensors)
    return tensors


@pytest.mark.parametrize("family, default", [
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("gpt_neox", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    ("opt", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ("gpt2", ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]),
    ("mixtral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
])
def test_unset_targets_are_the_family_roles(family, default, one_thread):
    model, _ = tiny_family(family)
    assert make_plan(model, ShardsConfig(**LORA)).targets == default


@pytest.mark.parametrize("family, targets", [("phi3", ["qkv"]), ("gpt_neox", ["query_key_value"]),
                                             ("opt", ["out_proj", "fc1"]), ("gpt2", ["c_attn", "mlp.c_proj"])])
def test_adapted_output_equals_the_merged_weights(family, targets, one_thread):
    model, _ = tiny_family(family)
    plan = make_plan(model, ShardsConfig(targets=targets, **LORA))
    assert plan.targets == [f"{t}_proj" if t == "qkv" else t for t in targets]
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        _trained(model, plan)
        adapted = model(input_ids=ids).logits
        merge_all(model)
        merged = model(input_ids=ids).logits
    assert (adapted - dense).abs().max() > 1e-3  # the adapters act
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)  # Conv1D's ΔW merged transposed


def test_an_explicit_llama_target_on_another_family_is_refused_in_one_line(one_thread):
    model, _ = tiny_family("opt")
    with pytest.raises(UsageError) as err:
        make_plan(model, ShardsConfig(targets=["o_proj"], **LORA))
    msg = str(err.value)
    assert "\n" not in msg and "model type 'opt'" in msg and "'o_proj' is not an nn.Linear" in msg
    assert "out_proj" in msg  # names what the blocks have


def test_gpt2s_c_proj_is_named_by_its_path():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"'attn\.c_proj',? (or )?'mlp\.c_proj'"):  # c_proj is in attn and mlp
        ShardsConfig(targets=["c_proj"], **LORA)


def test_conv1d_peft_export_uses_fan_in_fan_out(tmp_path, one_thread):
    from peft import PeftModel

    model, _ = tiny_family("gpt2")
    base, _ = tiny_family("gpt2")
    plan = make_plan(model, ShardsConfig(targets=["c_attn", "attn.c_proj"], **LORA))
    _trained(model, plan)
    write_peft_lora(model, plan, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and set(cfg["target_modules"]) == {"c_attn", "attn.c_proj"}
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "lora")).eval()
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    tiny, _ = tiny_family("llama")  # an nn.Linear export keeps peft's default
    lplan = make_plan(tiny, ShardsConfig(targets=["q"], **LORA))
    _trained(tiny, lplan)
    write_peft_lora(tiny, lplan, tmp_path / "llama")
    assert json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_a_prediction_from_a_config_shape_knows_llamas_projections_only():
    """A Shape built from a config (pure search tests) has no measured linears: Llama's names, by formula
    (a model's measured Shape predicts any family: tests/search/test_search_predicted_families.py)."""
    from adaflex.retrofit.shards import predicted_dims
    from adaflex.search.cost import Shape

    shape = Shape(num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16,
                  vocab_size=259)
    got = predicted_dims(shape, ShardsConfig(targets=["q_proj", "down_proj"], **LORA))
    assert got == {"q_proj": (64, 64), "down_proj": (96, 64)}
    with pytest.raises(UsageError, match=r"^shards.targets: .* not 'fc1'; run the recipe to measure it$"):
        predicted_dims(shape, ShardsConfig(targets=["q_proj", "fc1"], **LORA))
