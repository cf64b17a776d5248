"""The drop stage: block influence, choice, removal with a valid cache, export and reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import adaflex.retrofit as af
from adaflex.retrofit import load
from adaflex.retrofit.drop.apply import apply, block_influence, choose
from adaflex.retrofit.drop.plan import DropPlan
from adaflex.retrofit.evaluate import cost_figures
from adaflex.retrofit.pipeline import run
from tiny import GENERATED

RECIPE = {
    "data": {"calibration": {"path": "generated", "samples": 3, "seq_len": 48}, "generated": GENERATED},
    "stages": [{"drop": {"blocks": 2}}],
    "eval": [{"task": "perplexity", "data": "generated:test", "seq_len": 48, "limit": 2}],
}


def test_block_influence_matches_hidden_states(tiny):
    model, _ = tiny
    x = torch.randint(0, 250, (2, 24))
    bi = block_influence(model, x, batch_size=1)
    with torch.no_grad():
        hs = model.model(x, output_hidden_states=True).hidden_states
    # hidden_states[i] enters block i; the last entry is after the final norm, so compare blocks 0..L-2
    for i in range(len(bi) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item()
        assert bi[i] == pytest.approx(1 - cos, abs=1e-5)


def test_choose_lowest_and_protect():
    assert choose([0.5, 0.1, 0.3, 0.05], 2, []) == [1, 3]
    assert choose([0.5, 0.1, 0.3, 0.05], 2, [3]) == [1, 2]


def test_apply_removes_and_generates(tiny):
    model, tok = tiny
    apply(model, DropPlan(num_layers=4, kept=[0, 2], removed=[1, 3], block_influence=[0.0] * 4))
    assert model.config.num_hidden_layers == 2
    assert [blk.self_attn.layer_idx for blk in model.model.layers] == [0, 1]
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
    c = cost_figures(model, torch.randint(0, 250, (2, 16)))
    assert c["layers_executed_mean"] == 2 and c["kv_bytes_ratio"] == pytest.approx(0.5)
    assert c["sparsity"] == pytest.approx(0.5)


def test_run_export_reload_roundtrip(tiny_dir, tmp_path):
    report = af.run(RECIPE, str(tiny_dir), out=tmp_path / "run")  # the Python API of README.md, "Python API"
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    removed = plan["stages"][0]["plan"]["removed"]
    assert len(removed) == 2 and report["layers_executed_mean"] == 2
    assert report["evals"][0]["dense"]["value"] != report["evals"][0]["retrofitted"]["value"]
    assert {"recipe.yaml", "plan.json", "adaflex.safetensors", "report.json"} <= {
        p.name for p in (tmp_path / "run").iterdir()}

    af.export(tmp_path / "run", tmp_path / "exp")
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["adaflex"]["methods"] == ["drop"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    restored, _ = load(tmp_path / "exp")
    from_run, _ = load(tmp_path / "run")
    x = torch.randint(0, 250, (2, 20))
    with torch.no_grad():
        a, b, c = plain(x).logits, restored(x).logits, from_run(x).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    # the restored model reports cost against the dense reference, not its own shape
    assert cost_figures(restored, x)["layers_executed_mean"] == 2
    assert cost_figures(restored, x)["num_layers"] == 4
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exp" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and len(meta["adaflex.recipe_sha256"]) == 64


def test_rerun_resumes_and_other_recipe_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run(RECIPE, str(tiny_dir), out=out)
    stamp = (out / "state" / "stage-0.json").stat().st_mtime_ns
    run(RECIPE, str(tiny_dir), out=out)
    assert (out / "state" / "stage-0.json").stat().st_mtime_ns == stamp  # not refitted
    other = json.loads(json.dumps(RECIPE))
    other["stages"][0]["drop"]["blocks"] = 1
    from adaflex.retrofit.errors import UsageError

    with pytest.raises(UsageError, match="another recipe"):
        run(other, str(tiny_dir), out=out)
