"""Bad settings are usage errors (exit 2) named by their recipe key, before anything is written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.recipe import validate
from adaflex.retrofit.shards.apply import check
from adaflex.retrofit.shards.config import ShardsConfig, mos_feasibility
from adaflex.retrofit.shards.plan import trainable_params
from tiny import GENERATED, tiny_llama


def _recipe(**shards):
    return {"data": {"calibration": {"path": "generated", "samples": 2, "seq_len": 32}, "generated": GENERATED},
            "stages": [{"shards": shards}]}


def test_shards_settings_validated_in_recipe():
    r = validate(_recipe(method="mos", rank=8, equivalent_rank=1, shards_per_vector=4, private_rank=0,
                         targets=["q", "v"]))
    (_, cfg), = r.stage_items()
    assert cfg.targets == ["q_proj", "v_proj"]
    for bad, key in [({"private_rank": 2, "equivalent_rank": 1}, "private_rank"),
                     ({"equivalent_rank": 9, "rank": 8}, "equivalent_rank"),
                     ({"method": "dora"}, "method"), ({"targets": ["lm_head"]}, "targets"),
                     ({"loss": "mse"}, "loss"), ({"rank": 0}, "rank"), ({"typo": 1}, "typo")]:
        with pytest.raises(UsageError, match=f"stages.0.shards.*{key}|{key}"):
            validate(_recipe(**bad))


def test_shards_model_checks():
    model = tiny_llama()  # dims 64, 32, 160: shards_per_vector must divide 32
    with pytest.raises(UsageError, match=r"stages.0.shards.shards_per_vector: 3 does not divide"):
        check(model, ShardsConfig(shards_per_vector=3), "recipe: stages.0.shards")
    with pytest.raises(UsageError, match=r"stages.0.shards.rank: .*exceed the public pool"):
        check(model, ShardsConfig(rank=8, equivalent_rank=1, shards_per_vector=4), "recipe: stages.0.shards")
    check(model, ShardsConfig(rank=8, equivalent_rank=1, shards_per_vector=4, subset_selection=False), "x")
    check(model, ShardsConfig(rank=8, equivalent_rank=2, shards_per_vector=32), "x")
    check(model, ShardsConfig(method="lora", rank=8, shards_per_vector=3), "x")  # lora ignores MoS keys


SMOL = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
        "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def test_mos_rule_and_parameter_count_on_smollm2_shapes():
    plan = {"method": "mos", "rank": 8, "equivalent_rank": 1, "num_layers": 30, "shapes": SMOL}
    assert trainable_params(**plan) == 305_280  # methods.md: one unit of rank on SmolLM2-135M
    assert trainable_params(**{**plan, "method": "lora"}) == 8 * 305_280
    assert mos_feasibility(8, 1, 4, 0, num_layers=30) is None
    assert "private_rank" in mos_feasibility(8, 1, 4, 2, num_layers=30)
    assert "exceeds rank" in mos_feasibility(4, 8, 4, 0)
    assert "no public pool" in mos_feasibility(4, 2, 4, 2)
    # 64 public vectors of 4 shards need 256 distinct shards per layer; the public pool holds 1·30·4
    assert "without replacement" in mos_feasibility(64, 1, 4, 0, num_layers=30)
    assert mos_feasibility(64, 1, 4, 0, num_layers=30, subset=False) is None
    assert mos_feasibility(64, 1, 4, 0) is None  # the block count is not known at recipe validation
    assert mos_feasibility(30, 1, 4, 0, num_layers=30) is None  # at the edge: the whole pool, once


@pytest.mark.parametrize("setting,needle", [("shards.shards_per_vector=3", "does not divide"),
                                            ("shards.rank=8", "without replacement"),
                                            ("shards.private_rank=4", "private_rank")])
def test_shards_cli_bad_config_exit_2(tiny_dir, tmp_path, setting, needle):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["retrofit", str(tiny_dir), "--recipe", "recipes/ci/shards-tiny.yaml",
                                   "--set", "shards.equivalent_rank=1", "--set", setting, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "shards" in res.output
    assert not out.exists() or not any(out.iterdir())  # nothing written
