"""End to end on the tiny model: drop + shards run, export to peft LoRA (same logits), merged export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adaflex.retrofit.checkpoint import export
from adaflex.retrofit.pipeline import run
from adaflex.retrofit.recipe import load_recipe
from adaflex.retrofit.restore import load
from adaflex.retrofit.shards.layer import adapted


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    import os

    from tiny import ROOT

    os.chdir(ROOT)
    out = tmp_path_factory.mktemp("shards") / "run"
    report = run(load_recipe("recipes/ci/shards-tiny.yaml"), str(tiny_dir), out=out, log=lambda m: None)
    return out, report


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_shards_run_report_and_compact_file(run_dir):
    out, report = run_dir
    stage = report["stages"][1]
    L, dims = 3, [(64, 64), (64, 32), (64, 32), (64, 64), (64, 160), (64, 160), (160, 64)]
    want = 2 * L * sum(a + b for a, b in dims)  # equivalent_rank 2
    assert stage["method"] == "shards" and stage["trainable_params"] == want == report["trainable_params"]
    assert stage["holdout_loss_after"] < stage["holdout_loss_before"]
    t = load_file(str(out / "adaflex.safetensors"))
    pools = [k for k in t if ".pool." in k]
    assert len(pools) == 14 and all(k.startswith("stages.1.shards.pool.") for k in pools)
    assert all(t[k].dtype == torch.uint8 for k in t if ".index." in k)
    assert sum(t[k].numel() for k in pools) == want


def test_shards_peft_lora_export_matches_adaflex_load(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = run_dir
    exp = export(out, tmp_path / "exp")
    cfg = json.loads((exp / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    assert json.loads((exp / "config.json").read_text())["adaflex"]["stages"][1]["baked"] is False
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ours, _ = load(str(exp))
    assert len(adapted(ours)) == 3 * 7
    with safe_open(str(exp / "model.safetensors"), "pt") as f:
        assert not any("adaflex" in k for k in f.keys())  # noqa: SIM118
    base = AutoModelForCausalLM.from_pretrained(str(exp)).eval()
    plain = _logits(base, ids)
    peft_model = PeftModel.from_pretrained(base, str(exp / "lora")).eval()
    got, want = _logits(peft_model, ids), _logits(ours, ids)
    assert (want - plain).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # ΔW of the exported LoRA equals the MoS ΔW
    lora = load_file(str(exp / "lora" / "adapter_model.safetensors"))
    for name, m in adapted(ours):
        a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(b @ a * (16 / 4), m.adaflex_delta.delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(load(str(out))[0], ids), want, atol=1e-5, rtol=0)  # the run dir too


def test_shards_merged_export(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = run_dir
    exp = export(out, tmp_path / "merged", merge_adapters=True)
    assert not (exp / "lora").exists()
    block = json.loads((exp / "config.json").read_text())["adaflex"]
    assert block["merge_adapters"] and block["stages"][1]["baked"] is True
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    want = _logits(load(str(out))[0], ids)
    hf = AutoModelForCausalLM.from_pretrained(str(exp)).eval()
    torch.testing.assert_close(_logits(hf, ids), want, atol=1e-4, rtol=0)
    ours, _ = load(str(exp))
    assert not adapted(ours)  # baked: not applied twice
    torch.testing.assert_close(_logits(ours, ids), want, atol=1e-4, rtol=0)
