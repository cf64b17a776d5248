"""drop + width + shards on the tiny model: the adapters attach to the narrower linears, and the run, its
export and the reload agree. MoS pools hold one shape per target projection, so per-block widths compose
with shards on the projections they leave alone (here: FFN-only widths, adapters on attention)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adaflex.retrofit.arch import decoder_layers
from adaflex.retrofit.checkpoint import export
from adaflex.retrofit.pipeline import run
from adaflex.retrofit.restore import load, load_run
from tiny import GENERATED

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
RECIPE = {
    "seed": 0,
    "data": {"calibration": {"path": "generated", "samples": 8, "seq_len": 32}, "generated": GENERATED},
    "stages": [
        {"drop": {"blocks": 1}},
        {"width": {"fraction": 0.3, "allocation": "dp", "channel_multiple": 16, "levels": 4, "curve_samples": 2}},
        {"shards": {"method": "mos", "rank": 4, "equivalent_rank": 2, "shards_per_vector": 4, "private_rank": 0,
                    "steps": 2, "lr": 0.005, "batch_size": 4, "holdout": 2}},
    ],
    "eval": [{"task": "perplexity", "data": "generated:test", "seq_len": 32, "limit": 2}],
}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


UNIFORM = {"allocation": "uniform", "fraction": None, "intermediate_size": 96, "num_heads": 2, "num_kv_heads": 1}
PER_BLOCK_FFN = {"prune": "mlp"}


@pytest.mark.parametrize("width, targets", [(UNIFORM, None), (PER_BLOCK_FFN, ["q_proj", "k_proj", "v_proj", "o_proj"])])
def test_drop_width_shards_compose_and_reload(tiny_dir, tmp_path, width, targets):
    from adaflex.retrofit.shards.layer import adapted

    recipe = copy.deepcopy(RECIPE)
    recipe["stages"][1]["width"].update(width)
    if targets:
        recipe["stages"][2]["shards"]["targets"] = targets
    report = run(recipe, str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    wplan = plan["stages"][1]["plan"]
    assert wplan["num_layers"] == 3 and wplan["uniform"] == (width is UNIFORM)
    assert report["stages"][2]["method"] == "shards"
    model, _ = load_run(tmp_path / "run")
    assert len(decoder_layers(model)) == 3
    for blk, w in zip(decoder_layers(model), wplan["widths"], strict=True):
        assert blk.mlp.down_proj.in_features == w["channels"]
    shapes = {name: (lin.in_features, lin.out_features) for name, lin in adapted(model)}
    for b, w in enumerate(wplan["widths"]):  # the adapters sit on the narrow linears
        heads = w["kv_groups"] * w["per_group"] * 16
        assert shapes[f"model.layers.{b}.self_attn.o_proj"] == (heads, 64)
        if not targets:
            assert shapes[f"model.layers.{b}.mlp.down_proj"] == (w["channels"], 64)
    exp = export(tmp_path / "run", tmp_path / "exp")
    ours, _ = load(str(exp))
    assert torch.equal(_logits(ours), _logits(model))
