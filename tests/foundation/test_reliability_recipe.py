"""Issue 23: the recipe loader and `--set` end every bad input in one UsageError line naming the file (or --set)
and the key; `recipe validate` refuses what `retrofit` and `search` refuse before loading a model."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit import recipe as recipe_mod
from adaflex.retrofit import registry, schema
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.recipe import load_recipe, recipes_root

runner = CliRunner()
DROP = recipes_root() / "ci" / "drop-tiny.yaml"
QUICK = recipes_root() / "ci" / "quickstart-tiny.yaml"


def _refused(path, sets=(), *needles):
    with pytest.raises(UsageError) as e:
        load_recipe(path, list(sets))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, (msg, n)
    return msg


@pytest.mark.parametrize("body, needle", [
    (b"seed: 0\n\xff\xfe: 1\n", "not UTF-8"),
    (b"seed: " + b"[" * 500 + b"]" * 500 + b"\n", "nested"),
    (b"seed: " + b"9" * 5000 + b"\n", "seed"),
    (b"", "empty"),
    (b"# only a comment\n", "empty"),
    (b"{}\n", "empty"),
    (b"a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e]\n",
     "aliases"),
])
def test_hostile_files_are_one_line(tmp_path, body, needle):
    f = tmp_path / "r.yaml"
    f.write_bytes(body)
    _refused(f, (), str(f), needle)


def test_duplicate_keys_are_an_error_naming_the_key(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text(DROP.read_text() + "stages: []\n")  # appended: the last one used to win silently
    _refused(f, (), str(f), "duplicate key 'stages'")
    f.write_text("base: &b {blocks: 1}\nstages:\n  - drop: {<<: *b, blocks: 2}\n")  # merge keys may be overridden
    with pytest.raises(UsageError, match="base"):  # (an unknown key, not a duplicate)
        load_recipe(f)


@pytest.mark.parametrize("setting, key", [
    ("seed=[1", "--set seed"),
    ("seed.x=1", "--set seed.x"),
    ("eval.0.data.x=1", "--set eval.0.data.x"),
    ("drop.blocks.x.y=1", "--set drop.blocks.x.y"),
    ("eval.99=1", "--set eval.99"),
    ("eval.٣=1", "--set eval.٣"),
    ("seed=" + "9" * 5000, "seed"),
    ("seed=1000000000000000000000000000000", "seed"),
    ("shards.rank=true", "stages.1.shards.rank"),
    ("drop.blocks=true", "--set drop.blocks"),
    ("data.calibration.samples=true", "data.calibration.samples"),
    ("shards.lr=.inf", "stages.1.shards.lr"),
    ("shards.lr=.nan", "stages.1.shards.lr"),
    ("data.calibration.samples=1000000000000", "data.calibration.samples"),
    ("eval.0.seq_len=100000000", "eval.0.seq_len"),
    ("prune.sparsity=-.inf", "stages.0.prune.sparsity"),
    ("search.stages.kv.budget={low: 0.2, high: 1.0, step: 0}", "search.stages"),
    ("search.stages.prune.sparsity={low: 0.1, high: .inf}", "search.stages"),
    ("search.stages.routes.max_executed={low: 2, high: 4, log: 1}", "search.stages"),
])
def test_bad_settings_are_one_line_naming_the_key(setting, key):
    _refused(QUICK, [setting], key)


def test_set_into_a_non_mapping_top_level(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(DROP.read_text().replace("stages:\n  - drop: {blocks: 1}\n", "stages: 5\n"))
    _refused(f, ["drop.blocks=2"], "--set drop.blocks", "no 'drop' stage")


def test_every_count_has_a_documented_upper_bound():
    """Each int setting of the recipe and of every method has `le`, and its description says why."""
    import annotated_types

    models = [recipe_mod.Recipe, recipe_mod.CalibrationData, recipe_mod.EvalSpec]
    models += [registry.config_class(m) for m in registry.METHODS]
    from adaflex.retrofit.search_space import QualitySpec, SearchSection

    models += [QualitySpec, SearchSection]
    missing = []
    for model in models:
        for name, field in model.model_fields.items():
            if not re.search(r"\bint\b", str(field.annotation)) or "list" in str(field.annotation):
                continue
            le = [m.le for m in field.metadata if isinstance(m, annotated_types.Le)]
            if not le or le[0] > 2**64:
                missing.append(f"{model.__name__}.{name}")
    assert not missing, missing
    assert any(cap.why in (recipe_mod.CalibrationData.model_fields["samples"].description or "")
               for cap in (schema.WINDOWS,))


def test_validate_refuses_what_search_refuses():
    res = runner.invoke(app, ["recipe", "validate", str(QUICK), "--set",
                              "search.stages.kv.budget={low: 0.2, high: 1.0, step: 0}"])
    assert res.exit_code == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "step" in res.stderr
    # a fixed search value that the stage's settings refuse (search would load the model, then fail)
    res = runner.invoke(app, ["recipe", "validate", str(QUICK), "--set", "search.stages.kv.sinks=-1"])
    assert res.exit_code == 2 and "search.stages.kv" in res.stderr, res.stderr
    res = runner.invoke(app, ["recipe", "validate", str(QUICK)])
    assert res.exit_code == 0, res.stderr


def test_validate_reads_data_and_eval_settings(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    res = runner.invoke(app, ["recipe", "validate", str(DROP), "--set", f"eval.1.data={bad}"])
    assert res.exit_code == 2 and str(bad) in res.stderr, res.stderr
    res = runner.invoke(app, ["recipe", "validate", str(DROP), "--set", "eval.0.context=32"])
    assert res.exit_code == 2 and "eval.0" in res.stderr and str(DROP) in res.stderr, res.stderr


def test_error_lines_never_break():
    msg = str(UsageError("a\nb\u2028c\rd"))
    assert len(msg.splitlines()) == 1 and "\\n" in msg
