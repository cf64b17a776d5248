"""Recipe schema, overrides and the one-line error contract, including a hypothesis fuzz of bad recipes."""

from __future__ import annotations

import copy
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.recipe import apply_override, list_packaged, load_recipe, recipes_root, validate
from tiny import names_shared, require_shared, shared_missing

runner = CliRunner()
VALID = {
    "seed": 0,
    "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 64}},
    "stages": [{"drop": {"blocks": 1}}],
    "eval": [{"task": "perplexity", "data": "generated:test", "seq_len": 64, "limit": 2}],
}


@pytest.mark.parametrize("name", [str(p) for p in list_packaged()])
def test_every_packaged_recipe_validates(name):
    if names_shared(recipes_root() / name):  # a benchmark (or per-method) recipe on the project's real data
        require_shared()
    validate(yaml.safe_load((recipes_root() / name).read_text()), name)


def test_cli_validate_all_packaged():
    files = [recipes_root() / p for p in list_packaged()]
    if shared_missing():  # in a clone: those that need nothing beside the package
        files = [f for f in files if not names_shared(f)]
    res = runner.invoke(app, ["recipe", "validate", *map(str, files)])
    assert res.exit_code == 0, res.stderr


def test_all_errors_reported_at_once(tmp_path):
    bad = copy.deepcopy(VALID)
    bad["seed"] = "x"
    bad["stages"][0]["drop"]["blocks"] = "three"
    bad["eval"][0]["data"] = "missing.txt"
    bad["colour"] = 1
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    with pytest.raises(UsageError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(f))
    for key in ("seed", "stages.0.drop.blocks", "eval.0.data", "colour"):
        assert key in msg


def test_override_addresses_first_stage_and_is_validated():
    raw = copy.deepcopy(VALID)
    apply_override(raw, "drop.blocks=2")
    apply_override(raw, "data.calibration.samples=8")
    rec = validate(raw)
    assert rec.stage_items()[0][1].blocks == 2 and rec.data.calibration.samples == 8
    with pytest.raises(UsageError, match="no 'prune' stage|unknown key"):
        apply_override(copy.deepcopy(VALID), "prune.sparsity=0.5")
    with pytest.raises(UsageError, match="unknown key 'nonsense'"):
        apply_override(copy.deepcopy(VALID), "nonsense.x=1")
    raw = copy.deepcopy(VALID)
    apply_override(raw, "drop.blocks=-1")
    with pytest.raises(UsageError, match="stages.0.drop.blocks"):
        validate(raw, "r.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("seed: 0\nstages: [\n")
    res = runner.invoke(app, ["recipe", "validate", str(f)])
    assert res.exit_code == 2
    assert str(f) in res.stderr and "line" in res.stderr


# ---- hypothesis: malformed recipes always end in one line naming file and key, exit 2, nothing written ----

_words = st.text(alphabet=string.ascii_lowercase, min_size=3, max_size=8)
_wrong_values = st.one_of(st.text(max_size=5).map(lambda s: "x" + s), st.lists(st.integers(), max_size=2),
                          st.dictionaries(_words, st.integers(), min_size=1, max_size=1),
                          st.floats(-5, -0.1).filter(lambda f: f != int(f)))

# (path to mutate, key that the message must name)
_TYPED_KEYS = [
    (("seed",), "seed"),
    (("data", "calibration", "samples"), "data.calibration.samples"),
    (("data", "calibration", "seq_len"), "data.calibration.seq_len"),
    (("stages", 0, "drop", "blocks"), "stages.0.drop.blocks"),
    (("stages", 0, "drop", "fraction"), "stages.0.drop"),
    (("eval", 0, "task"), "eval.0.task"),
    (("eval", 0, "limit"), "eval.0.limit"),
    (("eval", 0, "seq_len"), "eval.0.seq_len"),
]
_MAPS = [((), ""), (("data",), "data"), (("data", "calibration"), "data.calibration"),
         (("stages", 0, "drop"), "stages.0.drop"), (("eval", 0), "eval.0")]
_FILES = [(("data", "calibration", "path"), "data.calibration.path"), (("eval", 0, "data"), "eval.0.data")]


def _set(d, path, value):
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


def _get(d, path):
    for p in path:
        d = d[p]
    return d


@st.composite
def malformed(draw):
    raw = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["unknown_key", "wrong_type", "missing_file", "unknown_stage", "wrong_layout"]))
    if kind == "unknown_key":
        path, where = draw(st.sampled_from(_MAPS))
        key = "zz" + draw(_words)
        _get(raw, path)[key] = draw(st.integers())
        return raw, (f"{where}.{key}" if where else key), None
    if kind == "wrong_type":
        path, where = draw(st.sampled_from(_TYPED_KEYS))
        value = draw(_wrong_values)
        if path[-1] == "fraction":
            raw["stages"][0]["drop"].pop("blocks")
        _set(raw, path, value)
        return raw, where, None
    if kind == "missing_file":
        path, where = draw(st.sampled_from(_FILES))
        _set(raw, path, f"no-such-dir/{draw(_words)}.txt")
        return raw, where, None
    if kind == "unknown_stage":
        raw["stages"] = [{"zz" + draw(_words): {"blocks": 1}}]
        return raw, "stages.0", None
    # a data file that exists but is in the wrong layout: caught before the model loads
    raw["eval"] = [{"task": "mc", "data": "@BADLAYOUT@"}]
    return raw, "@BADLAYOUT@", draw(st.sampled_from(['{"text": "no choices here"}', '{"question": "q"}', "not json"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=malformed())
def test_malformed_recipes_fail_cleanly(case, tmp_path):
    raw, key, layout_text = case
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    if layout_text is not None:
        bad = work / "bad.jsonl"
        bad.write_text(layout_text + "\n")
        raw["eval"][0]["data"] = str(bad)
        key = str(bad)
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = work / "out"
    res = runner.invoke(app, ["retrofit", "no-model-needed", "--recipe", str(recipe), "--out", str(out)])
    assert res.exit_code == 2, (res.stderr, raw)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert str(recipe) in lines[0] or key in lines[0]
    assert key in lines[0], (lines[0], key)
    assert not out.exists()
