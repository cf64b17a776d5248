"""Typed plans (retrofit/plan.py): a hand-edited or corrupt plan is refused in one line that names the file and
the key, wherever it is read back (a run's plan.json, an export's config.json, a resumed stage)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit.drop.plan import DropPlan
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.plan import read
from tiny import GENERATED

runner = CliRunner()
SMALL = {"data": {"calibration": {"path": "generated", "samples": 2, "seq_len": 32}, "generated": GENERATED},
         "stages": [{"drop": {"blocks": 1}}]}
GOOD = {"num_layers": 4, "removed": [3], "kept": [0, 1, 2], "block_influence": [0.9, 0.4, 0.2, 0.1]}


def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaflex: error:"), res.stderr
    for n in needles:
        assert n in lines[0], (lines[0], n)
    return lines[0]


@pytest.mark.parametrize("edit, key", [
    ({"removed": "3"}, "removed"),  # a type error names the key itself
    ({"removed": [2]}, "removed"),  # kept and removed overlap: the model validator names its key
    ({"kept": [0, 1]}, "kept"),
    ({"block_influence": [0.1]}, "block_influence"),
    ({"surprise": 1}, "surprise"),  # unknown keys are errors
])
def test_a_bad_plan_names_where_and_the_key(edit, key):
    with pytest.raises(UsageError, match=rf"^runs/x/plan.json: stages.0.plan.{key}: "):
        read(DropPlan, {**GOOD, **edit}, "runs/x/plan.json: stages.0.plan")
    assert read(DropPlan, GOOD, "p").dump() == GOOD


@pytest.fixture
def run_dir(tiny_dir, tmp_path):
    from adaflex.retrofit.pipeline import run

    run(SMALL, str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    return tmp_path / "run"


def _edit(path, edit):
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


def test_a_hand_edited_run_plan_is_one_line_exit_2(run_dir, tmp_path):
    _edit(run_dir / "plan.json", lambda p: p["stages"][0]["plan"].update(removed=[1, 3]))
    line = _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "e")]),
                           f"{run_dir / 'plan.json'}: stages.0.plan.removed: blocks [1] are also kept")
    assert not (tmp_path / "e").exists(), line
    _one_line_error(runner.invoke(app, ["eval", str(run_dir), "--task", "perplexity", "--data", "generated:test"]),
                    f"{run_dir / 'plan.json'}: stages.0.plan.removed: blocks [1] are also kept")
    _edit(run_dir / "plan.json", lambda p: p["stages"][0].update(method="nope"))
    _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "e")]),
                    f"{run_dir / 'plan.json'}: stages.0.method: unknown method 'nope'")


def test_a_hand_edited_export_plan_is_one_line_exit_2(run_dir, tmp_path):
    from adaflex.retrofit import export, load

    export(run_dir, tmp_path / "e")
    _edit(tmp_path / "e" / "config.json", lambda c: c["adaflex"]["stages"][0]["plan"].update(num_layers="4"))
    with pytest.raises(UsageError, match=r"config.json: adaflex.stages.0.plan.num_layers: "):
        load(str(tmp_path / "e"))


def test_a_corrupt_resumed_stage_names_its_file(tiny_dir, tmp_path):
    from adaflex.retrofit.pipeline import run

    out = tmp_path / "run"
    run(SMALL, str(tiny_dir), out=out, log=lambda m: None)
    (out / "plan.json").unlink()  # an unfinished run: the stage resumes from its state file
    _edit(out / "state" / "stage-0.json", lambda s: s["plan"].pop("kept"))
    with pytest.raises(UsageError, match=r"stage-0.json: plan.kept: Field required"):
        run(SMALL, str(tiny_dir), out=out, log=lambda m: None)
