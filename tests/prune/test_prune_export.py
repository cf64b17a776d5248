"""End to end through the CLI: exported per-linear sparsity equals the plan, 2:4 layout, error exits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit.prune.scores import semi_structured_problems

runner = CliRunner()


def _retrofit(tiny_dir, out, *sets, recipe="recipes/ci/prune-tiny.yaml"):
    args = ["retrofit", str(tiny_dir), "--recipe", recipe, "--format", "json"]
    if out is not None:
        args += ["--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def _check_export(run_dir, exp):
    r = runner.invoke(app, ["export", str(run_dir), "--out", str(exp)])
    assert r.exit_code == 0, r.output
    plan = json.loads((run_dir / "plan.json").read_text())["stages"][0]["plan"]
    weights = load_file(str(exp / "model.safetensors"))
    for e in plan["linears"]:
        if e.get("removed"):
            continue
        w = weights[e["param"]]
        zeros = w.numel() - int(torch.count_nonzero(w))
        assert zeros == round(e["sparsity"] * w.numel()) and zeros / w.numel() == e["sparsity"], e["param"]
    model = AutoModelForCausalLM.from_pretrained(exp)  # plain transformers loads the pruned model
    assert model.config.num_hidden_layers == plan["num_layers"] - len(plan["removed"])
    return plan, weights


def test_ci_recipe_dp_with_depth_export_matches_plan(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = _retrofit(tiny_dir, run_dir, "prune.sparsity=0.6", "prune.levels=[0.0, 0.3, 0.55]", "prune.protect=[0]")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    stage = report["stages"][0]
    assert stage["method"] == "prune" and stage["removed_blocks"]  # 60% needs depth with levels <= 0.55
    assert stage["additivity"]["configs"] >= 1 and "spearman" in stage["additivity"]
    assert report["retrofitted"]["sparsity"] == pytest.approx(stage["achieved"], abs=1e-9)
    assert report["layers_executed_mean"] == 4 - len(stage["removed_blocks"])
    plan = json.loads((run_dir / "plan.json").read_text())["stages"][0]["plan"]
    assert "additivity" in plan["dp"] and plan["dp"]["additivity"]["rows"]
    _check_export(run_dir, tmp_path / "export")


def test_two_four_export_passes_layout_rules(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    r = _retrofit(tiny_dir, run_dir, "prune.allocation=uniform", "prune.pattern=2:4", "prune.allow_drop=false")
    assert r.exit_code == 0, r.output
    plan, weights = _check_export(run_dir, tmp_path / "export")
    assert plan["semi_structured"]["ok"]
    for e in plan["linears"]:
        w = weights[e["param"]]
        assert e["sparsity"] == 0.5
        assert semi_structured_problems(w) == [], e["param"]


@pytest.mark.parametrize("sets, code, key", [
    (["prune.sparsity=1.0"], 2, "prune.sparsity"),
    (["prune.sparsity=-0.1"], 2, "prune.sparsity"),
    (["prune.pattern=2:3", "prune.allow_drop=false"], 2, "prune.pattern"),
    (["prune.sparsity=0.97", "prune.allow_drop=false"], 3, "prune.sparsity"),  # above max_sparsity 0.95
    (["prune.pattern=2:4", "prune.sparsity=0.6", "prune.allow_drop=false"], 3, "prune.sparsity"),
    (["prune.allocation=uniform", "prune.pattern=2:4", "prune.sparsity=0.6", "prune.allow_drop=false"], 2,
     "prune.sparsity"),
])
def test_bad_input_exits_and_writes_nothing(tiny_dir, tmp_path, sets, code, key):
    out = tmp_path / "run"
    r = _retrofit(tiny_dir, out, *sets)
    assert r.exit_code == code, r.output
    assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
