"""Issue 23: messages name their file (plans checked while loading, data checked while scoring), and an eval
longer than the model's position table warns in one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit.errors import UsageError
from tiny import GENERATED

runner = CliRunner()
WIKI = "../shared/data/wikitext2_dev.txt"


def test_plan_that_does_not_fit_the_model_names_plan_json(tiny_dir, tmp_path):
    from adaflex.retrofit.pipeline import run
    from adaflex.retrofit.restore import load_run

    run({"data": {"calibration": {"path": "generated", "samples": 2, "seq_len": 32}, "generated": GENERATED},
         "stages": [{"drop": {"blocks": 1}}]},
        str(tiny_dir), out=tmp_path / "run")
    plan_file = tmp_path / "run" / "plan.json"
    plan = json.loads(plan_file.read_text())
    plan["stages"][0]["plan"]["num_layers"] = 9
    plan_file.write_text(json.dumps(plan))
    with pytest.raises(UsageError, match=str(plan_file)):
        load_run(tmp_path / "run")
    res = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    assert res.exit_code == 2 and str(plan_file) in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_short_eval_data_names_the_file(tiny_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    res = runner.invoke(app, ["eval", str(tiny_dir), "--task", "perplexity", "--data", str(short), "--seq-len", "64"])
    assert res.exit_code == 2 and str(short) in res.stderr, res.stderr


def test_context_beyond_max_position_embeddings_warns(tiny, capsys):
    from adaflex.retrofit.evaluate import warn_positions

    model, _ = tiny
    warn_positions(model, "perplexity", 512, 2100, 16, "ppl")
    warn_positions(model, "perplexity", 512, None, None, "ok")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adaflex: warning: ppl: 2116 positions exceed the model's max_position_embeddings (2048)"]
