"""End to end on the tiny model: fit -> run dir -> load -> export -> reload, for per-block (DP, EvoPress)
and uniform widths; the uniform export is a plain LlamaForCausalLM; sizes and flops_ratio match the plan."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adaflex.retrofit.arch import decoder_layers, reference_of
from adaflex.retrofit.checkpoint import export
from adaflex.retrofit.evaluate import cost_figures
from adaflex.retrofit.pipeline import run
from adaflex.retrofit.recipe import load_recipe
from adaflex.retrofit.restore import load, load_run

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _run(tiny_dir, out, **settings):
    recipe = load_recipe("recipes/ci/width-tiny.yaml").to_dict()
    recipe["stages"][0]["width"].update(settings)
    report = run(recipe, str(tiny_dir), out=out, log=lambda m: None)
    plan = json.loads((out / "plan.json").read_text())["stages"][0]["plan"]
    return report, plan


def _linear_params(model) -> int:
    return sum(m.weight.numel() for blk in decoder_layers(model) for m in blk.modules()
               if isinstance(m, torch.nn.Linear))


def _check_sizes(model, plan, ids=IDS):
    """Block-linear parameters = block MACs per token; flops_ratio = (kept block MACs + head) / dense."""
    assert _linear_params(model) == plan["block_macs_kept"]
    ref = reference_of(model)
    head = ref["hidden_size"] * ref["vocab_size"]
    want = (plan["block_macs_kept"] + head) / ref["linear_macs_per_token"]
    assert cost_figures(model, ids)["flops_ratio"] == pytest.approx(want, rel=1e-12)
    for blk, w in zip(decoder_layers(model), plan["widths"], strict=True):
        assert blk.mlp.up_proj.out_features == w["channels"]
        assert blk.self_attn.q_proj.out_features == w["kv_groups"] * w["per_group"] * 16
        assert blk.self_attn.num_key_value_groups == w["per_group"]


@pytest.mark.parametrize("allocation", ["dp", "evo"])
def test_per_block_widths_export_reloads_with_equal_logits(tiny_dir, tmp_path, allocation):
    report, plan = _run(tiny_dir, tmp_path / "run", allocation=allocation, kv_groups=True)
    assert not plan["uniform"] and plan["removed"] >= 0.3
    stage = report["stages"][0]
    assert stage["evaluations"] == stage["curve_evaluations"] > 0  # DP and evolution: the same budget
    assert stage["distortion"] <= stage["uniform_distortion"] * 1.5
    model, _ = load_run(tmp_path / "run")
    _check_sizes(model, plan)
    assert report["retrofitted"]["flops_ratio"] == pytest.approx(cost_figures(model, IDS)["flops_ratio"])
    exp = export(tmp_path / "run", tmp_path / "exp")
    entry = json.loads((exp / "config.json").read_text())["adaflex"]["stages"][0]
    assert entry["baked"] is False and entry["export"] == "padded"
    ours, _ = load(str(exp))
    _check_sizes(ours, plan)
    assert torch.equal(_logits(ours), _logits(model))
    # plain transformers reads the zero-padded weights as the dense-shaped model: same function
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(exp)
    assert torch.allclose(_logits(plain), _logits(model), atol=1e-4)


def test_uniform_export_is_a_plain_smaller_llama(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _, plan = _run(tiny_dir, tmp_path / "run", allocation="uniform", fraction=None, intermediate_size=96,
                   num_heads=2, num_kv_heads=1, refit=True)
    assert plan["uniform"] and plan["widths"][0] == {"channels": 96, "kv_groups": 1, "per_group": 2}
    model, tok = load_run(tmp_path / "run")
    exp = export(tmp_path / "run", tmp_path / "exp")
    cfg = json.loads((exp / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) \
        == (96, 2, 1, 16)
    assert cfg["adaflex"]["stages"][0]["baked"] is True
    weights = load_file(str(exp / "model.safetensors"))
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (64, 96)
    plain = AutoModelForCausalLM.from_pretrained(exp)
    assert torch.equal(_logits(plain), _logits(model))
    _check_sizes(load(str(exp))[0], plan)
    gen = plain.generate(IDS[:1, :8], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 13)
