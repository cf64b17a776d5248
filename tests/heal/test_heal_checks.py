"""Bad input to `heal` is one line and exit 2: not the last stage, a zero token budget, nothing to train."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

import adaflex.retrofit as af
from adaflex.cli.main import app
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.recipe import validate

from .helpers import recipe, run


def _cli(tiny_dir, tmp_path, rec: dict):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    return CliRunner().invoke(app, ["retrofit", str(tiny_dir), "--recipe", str(path), "--out", str(tmp_path / "o")])


def test_heal_must_be_the_last_stage(tiny_dir, tmp_path, one_thread):
    rec = recipe()
    rec["stages"].append({"drop": {"blocks": 1}})
    with pytest.raises(UsageError, match=r"stages.0.heal: heal must be the last stage \(followed by drop\)"):
        run(tiny_dir, rec)
    res = _cli(tiny_dir, tmp_path, rec)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if "error" in ln]
    assert len(errors) == 1 and "stages.0.heal: heal must be the last stage" in errors[0], res.output


def test_heal_not_last_is_refused_before_the_model_loads(tmp_path):
    # the model path does not exist: a refusal that waited for the model would name the path instead
    rec = recipe()
    rec["stages"].append({"drop": {"blocks": 1}})
    missing = tmp_path / "no-model"
    with pytest.raises(UsageError, match=r"^recipe: stages.0.heal: heal must be the last stage \(followed by drop\)$"):
        af.run(rec, str(missing), log=lambda m: None)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    res = CliRunner().invoke(app, ["recipe", "validate", str(path)])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if "error" in ln]
    assert errors == [f"adaflex: error: {path}: stages.0.heal: heal must be the last stage (followed by drop)"], \
        res.output
    res = CliRunner().invoke(app, ["retrofit", str(missing), "--recipe", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "heal must be the last stage" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_heal_last_passes_validate(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe({"drop": {"blocks": 1}})))
    res = CliRunner().invoke(app, ["recipe", "validate", str(path)])
    assert res.exit_code == 0 and "ok" in res.output, res.output


def test_zero_token_budget_with_trainables_is_refused(tiny_dir, tmp_path):
    rec = recipe({"drop": {"blocks": 1}}, tokens=0)
    with pytest.raises(UsageError, match=r"stages.1.heal.*tokens: 0 with train"):
        validate(rec)
    res = _cli(tiny_dir, tmp_path, rec)
    assert res.exit_code == 2 and "tokens: 0" in res.output, res.output
    assert not (tmp_path / "o").exists()
    path = tmp_path / "r.yaml"
    res = CliRunner().invoke(app, ["recipe", "validate", str(path)])
    errors = [ln for ln in res.output.splitlines() if "error" in ln]
    assert res.exit_code == 2 and len(errors) == 1 and "stages.1.heal: tokens: 0 with train" in errors[0], res.output


@pytest.mark.parametrize("heal,needle", [({"train": []}, "train"), ({"train": ["head", "head"]}, "twice"),
                                         ({"train": ["norms"], "last_blocks": 0}, "last_blocks")])
def test_bad_settings(heal, needle):
    with pytest.raises(UsageError, match=needle):
        validate(recipe(**heal))


def test_last_blocks_beyond_the_model(tiny_dir, tmp_path):
    res = _cli(tiny_dir, tmp_path, recipe(train=["last_blocks"], last_blocks=9))
    assert res.exit_code == 2 and "stages.0.heal.last_blocks: 9 exceeds" in res.output, res.output
