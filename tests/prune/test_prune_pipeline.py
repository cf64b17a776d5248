"""Layer capture for any decoder signature, uniform / OWL / DP allocation, curve cache resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaflex.retrofit.prune import curves
from adaflex.retrofit.prune.calibrate import capture, dense_statistics
from adaflex.retrofit.prune.curves import dense_trace

from .helpers import run_fit


def _block_linears(model):
    return [(b, n, m) for b, blk in enumerate(model.model.layers) for n, m in blk.named_modules()
            if isinstance(m, torch.nn.Linear)]


def _qwen2_sliding():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
                      max_window_layers=2,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2-sliding"])
def test_block_by_block_reproduces_the_model(arch, tiny):
    """Calling each block with its recorded arguments gives the model's own hidden states, also when
    blocks get different masks (sliding-window and full-attention layers)."""
    model = tiny[0] if arch == "llama" else _qwen2_sliding()
    ids = torch.randint(0, 250, (3, 24))
    cap = capture(model, ids, batch_size=2)
    trace = dense_trace(model, cap)
    with torch.no_grad():
        ref = model.model(input_ids=ids, use_cache=False).last_hidden_state
        got = torch.cat([model.model.norm(h) for h in trace[-1]])
    assert torch.allclose(got, ref, atol=1e-5)
    assert not any(hasattr(blk, "forward") and "forward" in vars(blk) for blk in model.model.layers)


def test_uniform_sparsity_is_exact(tiny):
    model, tok = tiny
    res, _ = run_fit(model, tok, sparsity=0.37, allocation="uniform", score="wanda")
    for e in res.plan["linears"]:
        n = int(np.prod(e["shape"]))
        assert e["pruned"] == round(0.37 * n)
        assert e["sparsity"] == e["pruned"] / n
    total = sum(int(np.prod(e["shape"])) for e in res.plan["linears"])
    assert res.plan["achieved"] == pytest.approx(0.37, abs=1 / total * len(res.plan["linears"]))
    for b, n, m in _block_linears(model):  # fit left the model pruned exactly as planned
        e = next(x for x in res.plan["linears"] if x["block"] == b and x["name"] == n)
        assert m.weight.numel() - int(torch.count_nonzero(m.weight)) == e["pruned"]


def test_owl_mean_density_is_the_target(tiny):
    model, tok = tiny
    res, _ = run_fit(model, tok, sparsity=0.6, allocation="owl", owl_lambda=0.1)
    s = np.array(res.plan["block_sparsity"])
    assert s.max() - s.min() > 0.05  # blocks differ ...
    assert s.max() - s.min() <= 0.2 + 1e-3  # ... within 2λ (up to whole-weight rounding)
    assert s.mean() == pytest.approx(0.6, abs=1e-3)  # equal blocks: the plain mean is the target
    assert res.plan["achieved"] == pytest.approx(0.6, abs=1e-3)
    lod = res.plan["owl"]["lod"]
    assert np.argmax(lod) == np.argmin(s)  # most outliers, least pruned


def test_dp_beats_uniform_on_the_measured_objective(tiny, tmp_path):
    model, tok = tiny
    res, _ = run_fit(model, tok, tmp_path, sparsity=0.6, allocation="dp", levels=6, curve_samples=3,
                     additivity_samples=2)
    dp = res.plan["dp"]
    rows = {r["kind"]: r for r in dp["additivity"]["rows"]}
    assert rows["chosen"]["predicted"] <= rows["uniform"]["predicted"] + 1e-12  # the DP's own optimum
    assert rows["chosen"]["measured"] < rows["uniform"]["measured"]  # and measured jointly, too
    assert len(set(dp["unit_levels"].values())) > 1
    assert res.plan["achieved"] >= 0.6 - 1e-3
    add = res.metrics["additivity"]
    assert add["configs"] >= 2 and add["chosen_measured"] > 0
    assert res.metrics["curve_points_measured"] > 0 and res.metrics["curve_points_cached"] == 0


def test_curves_cache_resumes_without_measuring(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    settings = {"sparsity": 0.5, "allocation": "dp", "levels": 5, "curve_samples": 2, "additivity_samples": 0}
    first, _ = run_fit(model, tok, tmp_path, **settings)
    assert (tmp_path / "curves.json").is_file()

    from adaflex.retrofit.models import load_hf

    def boom(*a, **k):
        raise AssertionError("a cached curve point was measured again")

    monkeypatch.setattr(curves.CurveMeasurer, "points", boom)
    fresh, tok2 = load_hf(model.name_or_path)
    again, _ = run_fit(fresh, tok2, tmp_path, **settings)
    assert again.metrics["curve_points_measured"] == 0
    assert again.metrics["curve_points_cached"] == first.metrics["curve_points_measured"]
    assert again.plan["dp"]["unit_levels"] == first.plan["dp"]["unit_levels"]
    # another target on the same grid (0, .25, .5, .75) reuses every point too
    other, _ = run_fit(load_hf(model.name_or_path)[0], tok2, tmp_path, **{**settings, "sparsity": 0.25})
    assert other.metrics["curve_points_measured"] == 0


def test_dp_may_drop_blocks(tiny, tmp_path):
    """Width alone cannot reach 65% with levels up to 0.5: the DP must remove blocks."""
    model, tok = tiny
    res, _ = run_fit(model, tok, tmp_path, sparsity=0.65, allocation="dp", levels=[0.0, 0.25, 0.5],
                     allow_drop=True, protect=[0], curve_samples=2, additivity_samples=0)
    assert res.plan["removed"] and 0 not in res.plan["removed"]
    assert res.plan["achieved"] >= 0.65 - 1e-3
    assert all(e["sparsity"] == 1.0 for e in res.plan["linears"] if e["block"] in res.plan["removed"])


def test_joint_measure_agrees_with_single_unit_points(tiny):
    model, _ = tiny
    ids = torch.randint(0, 250, (2, 24))
    stats = dense_statistics(model, capture(model, ids, batch_size=2))
    m = curves.CurveMeasurer(model, ids, stats, "wanda", None, True)
    units = curves.make_units(model, "block")
    pts = m.points(units[1], [0.3, 0.6, curves.DROP])
    lone = [[0.0, lv, 0.0, 0.0] for lv in (0.3, 0.6, curves.DROP)]
    assert m.configs(units, lone) == pytest.approx(pts, rel=1e-4, abs=1e-7)
    assert m.configs(units, [[0.0] * 4])[0] == pytest.approx(0.0, abs=1e-9)
    assert pts[0] < pts[1]
