"""LoRA after per-block widths: each block's adapter takes its own linear's shape (the stored factors are
zero-padded to the largest), for the `shards` stage and for `heal`'s adapters. MoS pools and peft LoRA exports
need one shape per target and say so in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from adaflex.retrofit.checkpoint import export
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.pipeline import run
from adaflex.retrofit.restore import load, load_run
from adaflex.retrofit.shards.layer import adapted
from tiny import GENERATED

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
WIDTH = {"width": {"fraction": 0.3, "allocation": "dp", "channel_multiple": 16, "levels": 4, "curve_samples": 2}}
LORA = {"method": "lora", "rank": 4, "dropout": 0.0}


def _recipe(last: dict) -> dict:
    return {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 8, "seq_len": 32},
                                "generated": GENERATED}, "stages": [copy.deepcopy(WIDTH), last]}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _per_block(run_dir) -> bool:
    wplan = json.loads((run_dir / "plan.json").read_text())["stages"][0]["plan"]
    return len({json.dumps(w, sort_keys=True) for w in wplan["widths"]}) > 1


def test_shards_lora_on_per_block_widths_trains_reloads_and_exports_merged(tiny_dir, tmp_path):
    rec = _recipe({"shards": {**LORA, "steps": 3, "lr": 0.01, "batch_size": 4, "holdout": 2}})
    run(rec, str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    assert _per_block(tmp_path / "run")
    splan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][1]["plan"]
    assert splan["method"] == "lora" and "block_shapes" in splan
    model, _ = load_run(tmp_path / "run")
    mods = dict(adapted(model))
    sizes = set()
    for name, lin in mods.items():  # every adapter has its own linear's shape, and training moved B off zero
        a, b = lin.adaflex_delta.factors()
        assert a.shape == (4, lin.in_features) and b.shape == (lin.out_features, 4)
        sizes.add((name.rsplit(".", 1)[-1], lin.in_features, lin.out_features))
    assert len(sizes) > len({s[0] for s in sizes})  # some target really has several shapes
    assert any(float(m.adaflex_delta.factors()[1].abs().sum()) > 0 for m in mods.values())
    n = sum(a.numel() + b.numel() for a, b in (m.adaflex_delta.factors() for m in mods.values()))
    assert splan["trainable_params"] == n
    with pytest.raises(UsageError, match="per-block shapes.*--merge-adapters") as e:
        export(tmp_path / "run", tmp_path / "exp")
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "exp").exists()
    exp = export(tmp_path / "run", tmp_path / "exp-merged", merge_adapters=True)
    ours, _ = load(str(exp))
    assert torch.allclose(_logits(ours), _logits(model), atol=1e-4)


def test_heal_lora_after_per_block_widths_merges_into_the_narrow_linears(tiny_dir, tmp_path):
    heal = {"heal": {"train": ["adapters", "norms"], "adapter": LORA, "tokens": 1024, "batch_size": 4, "top_k": 16,
                     "lr": 0.01}}
    report = run(_recipe(heal), str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    assert _per_block(tmp_path / "run")
    metrics = report["stages"][1]
    assert metrics["kl_after"] < metrics["kl_before"]
    model, _ = load_run(tmp_path / "run")
    assert not list(adapted(model))  # merged: nothing was pruned
    exp = export(tmp_path / "run", tmp_path / "exp")
    ours, _ = load(str(exp))
    assert torch.allclose(_logits(ours), _logits(model), atol=1e-4)


def test_mos_on_per_block_widths_is_one_line(tiny_dir, tmp_path):
    rec = _recipe({"shards": {"method": "mos", "rank": 4, "equivalent_rank": 2, "shards_per_vector": 4,
                              "private_rank": 0, "steps": 1, "batch_size": 4, "holdout": 2}})
    with pytest.raises(UsageError, match="different shapes across blocks.*use method: lora") as e:
        run(rec, str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    assert len(str(e.value).splitlines()) == 1
