"""Width on the families whose blocks are not Llama's (issue 26): OPT (two-matrix MLP with biases), GPT-NeoX
(two-matrix MLP, fused q/k/v interleaved per head), GPT-2 (Conv1D, weights [in, out]) and Phi-3 (fused qkv_proj,
fused gate_up_proj). For each: the narrowed model computes what the dense model computes with the removed
channels' down columns and the removed heads' o columns zeroed; its block parameters and flops_ratio are the
plan's; per-block widths export padded and reload with equal logits; uniform FFN widths export as a plain,
smaller model of the family (its own config key)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import adaflex.retrofit as af
from adaflex.retrofit.arch import decoder_layers, reference_of
from adaflex.retrofit.evaluate import cost_figures
from adaflex.retrofit.width.apply import apply, narrow_plan
from adaflex.retrofit.width.importance import collect, scores
from adaflex.retrofit.width.parts import dims_of, head_columns, out_in, to_module
from adaflex.retrofit.width.plan import WidthPlan
from adaflex.retrofit.width.shapes import BlockWidth
from tiny import GENERATED, tiny_family

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
# family -> (its FFN width's config key, the state-dict key of block 0's down projection, weight [in, out]?)
FAMILIES = {"opt": ("ffn_dim", "model.decoder.layers.0.fc2.weight", False),
            "gpt_neox": ("intermediate_size", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", False),
            "gpt2": ("n_inner", "transformer.h.0.mlp.c_proj.weight", True),
            "phi3": ("intermediate_size", "model.layers.0.mlp.down_proj.weight", False)}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _block_params(model) -> int:
    return sum(m.weight.numel() for blk in decoder_layers(model) for m in blk.modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


def _check_sizes(model, plan):
    """Block linear parameters = the plan's kept MACs per token; flops_ratio = (kept + head) / dense."""
    assert _block_params(model) == plan["block_macs_kept"]
    ref = reference_of(model)
    head = model.get_output_embeddings().weight.numel()
    want = (plan["block_macs_kept"] + head) / ref["linear_macs_per_token"]
    assert cost_figures(model, IDS)["flops_ratio"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_narrowed_equals_dense_with_removed_channels_and_heads_zeroed(family, one_thread):
    model, _ = tiny_family(family)
    dims, parts = dims_of(model, "test")
    st = collect(model, IDS, dims, parts)
    mlp_s, head_s = scores(model, st, "wanda", dims, parts)
    kv = max(1, dims.kv_heads // 2)  # whole KV groups go (multi-head families: heads)
    widths = [BlockWidth(dims.intermediate // 2, kv, dims.per_group),
              BlockWidth(dims.intermediate - 16, dims.kv_heads, max(1, dims.per_group // 2))]
    plan, tensors = narrow_plan(model, dims, widths, mlp_s, head_s)
    assert plan["dense"]["mlp_matrices"] == (3 if family == "phi3" else 2)
    zeroed = copy.deepcopy(model)
    for b, blk in enumerate(decoder_layers(zeroed)):
        for mod, cols in ((parts.down(blk), tensors[f"keep.{b}.channels"]),
                          (parts.o(blk), head_columns(tensors[f"keep.{b}.heads"], dims.head_dim))):
            w = torch.zeros_like(out_in(mod))
            w[:, cols] = out_in(mod)[:, cols]
            mod.weight.data = to_module(mod, w)
    apply(model, WidthPlan.model_validate(plan), tensors)
    down = parts.down(decoder_layers(model)[0])
    assert out_in(down).shape[1] == dims.intermediate // 2  # physically narrower
    torch.testing.assert_close(_logits(model), _logits(zeroed), rtol=0, atol=1e-5)
    _check_sizes(model, plan)
    d, w0 = dims, widths[0]
    macs = d.hidden * d.head_dim * (2 * w0.heads + 2 * w0.kv_groups) + d.mlp_matrices * d.hidden * w0.channels
    assert sum(out_in(m).numel() for m in decoder_layers(model)[0].modules()
               if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") == macs


def _run(family, tmp_path, **width):
    model, tok = tiny_family(family)
    src = tmp_path / "dense"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    recipe = {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 32},
                                  "generated": GENERATED},
              "stages": [{"width": {"channel_multiple": 16, "levels": 4, "curve_samples": 2, **width}}]}
    model, tok = af.load(str(src))
    report = af.run(recipe, model, tok, model_name=str(src), out=tmp_path / "run", log=lambda m: None)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][0]["plan"]
    return model, report, plan


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_block_widths_export_padded_and_reload(family, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    model, report, plan = _run(family, tmp_path, fraction=0.3, allocation="dp", kv_groups=True)
    assert not plan["uniform"] and plan["removed"] >= 0.3
    _check_sizes(model, plan)
    assert report["retrofitted"]["flops_ratio"] == pytest.approx(cost_figures(model, IDS)["flops_ratio"])
    exp = af.export(tmp_path / "run", tmp_path / "exp")
    entry = json.loads((exp / "config.json").read_text())["adaflex"]["stages"][0]
    assert entry["baked"] is False and entry["export"] == "padded"
    ours, _ = af.load(str(exp))
    _check_sizes(ours, plan)
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(exp)  # the zero-padded weights: the dense shape, same function
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uniform_ffn_width_exports_a_plain_smaller_model(family, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    key, down_key, conv1d = FAMILIES[family]
    model, _, plan = _run(family, tmp_path, fraction=0.25, allocation="uniform", prune="mlp")
    c = plan["widths"][0]["channels"]
    assert plan["uniform"] and c < plan["dense"]["intermediate"] and plan["removed"] >= 0.25
    exp = af.export(tmp_path / "run", tmp_path / "exp")
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg[key] == c and cfg["adaflex"]["stages"][0]["export"] == "plain"
    shape = load_file(str(exp / "model.safetensors"))[down_key].shape
    assert shape == ((c, 64) if conv1d else (64, c))
    plain = AutoModelForCausalLM.from_pretrained(exp)  # transformers alone builds the smaller shape
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-5)
    _check_sizes(plain, plan)
    assert plain.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_uniform_heads_plain_only_where_the_config_has_head_dim(family, tmp_path, one_thread):
    """Fewer heads of the same size: Phi-3 reads config.head_dim (plain export); OPT, GPT-NeoX and GPT-2 take
    hidden / heads, so their export is padded and adaflex's load narrows it again."""
    from transformers import AutoModelForCausalLM

    kv = 1 if family == "phi3" else 2  # Phi-3 has 2 KV heads of 2 query heads each; the others are multi-head
    model, _, plan = _run(family, tmp_path, allocation="uniform", fraction=None, num_heads=2, num_kv_heads=kv)
    assert plan["widths"][0]["kv_groups"] * plan["widths"][0]["per_group"] == 2
    exp = af.export(tmp_path / "run", tmp_path / "exp")
    cfg = json.loads((exp / "config.json").read_text())
    ours, _ = af.load(str(exp))
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=1e-5)
    _check_sizes(ours, plan)
    plain = AutoModelForCausalLM.from_pretrained(exp)
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=0, atol=1e-4)
    if family == "phi3":
        assert cfg["adaflex"]["stages"][0]["export"] == "plain"
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 16)
    else:
        assert cfg["adaflex"]["stages"][0]["export"] == "padded"
        assert cfg.get("num_attention_heads", cfg.get("n_head")) == 4  # the dense config: load narrows it


def test_lora_after_per_block_widths_on_conv1d(tmp_path, one_thread):
    """GPT-2's narrowed Conv1D take per-block LoRA factors (peft fan_in_fan_out); the merged export reloads."""
    from adaflex.retrofit.shards.layer import adapted

    lora = {"shards": {"method": "lora", "rank": 4, "dropout": 0.0, "steps": 2, "lr": 0.01, "batch_size": 4,
                       "holdout": 2}}
    model, tok = tiny_family("gpt2")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    recipe = {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 8, "seq_len": 32},
                                  "generated": GENERATED},
              "stages": [{"width": {"fraction": 0.3, "allocation": "dp", "channel_multiple": 16, "levels": 4,
                                    "curve_samples": 2, "kv_groups": True}}, lora]}
    af.run(recipe, str(tmp_path / "dense"), out=tmp_path / "run", log=lambda m: None)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"]
    assert not plan[0]["plan"]["uniform"] and "block_shapes" in plan[1]["plan"]
    model, _ = af.load(str(tmp_path / "run"))
    assert any(float(m.adaflex_delta.factors()[1].abs().sum()) > 0 for _, m in adapted(model))
    ours, _ = af.load(str(af.export(tmp_path / "run", tmp_path / "exp", merge_adapters=True)))
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=1e-4)
