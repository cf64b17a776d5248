"""The `kv` stage end to end: fit (offline plans), export -> load restores the plan, CLI passkey, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit import export, load, run
from adaflex.retrofit.errors import UsageError
from adaflex.search import kv_alloc

runner = CliRunner()
WIKI = "../shared/data/wikitext2_dev.txt"


def _recipe(data=WIKI, **kv):
    return {
        "data": {"calibration": {"path": str(data), "samples": 2, "seq_len": 80}},
        "stages": [{"kv": {"budget": 0.5, "allocation": "prefixkv", "policy": "snapkv", "sinks": 2, "window": 8,
                           "kernel": 3, **kv}}],
        "eval": [{"task": "perplexity", "data": str(data), "context": 64, "continuation": 16, "limit": 1}],
    }


def test_prefixkv_run_export_load_restores_plan(tiny_dir, text_file, tmp_path):
    report = run(_recipe(text_file), str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][0]["plan"]
    fr = plan["fractions"]
    assert len(fr) == 4 and sum(fr) / 4 == pytest.approx(0.5, abs=0.01)
    assert report["kv_bytes_ratio"] == pytest.approx(0.5, abs=0.05)
    assert report["dense"]["kv_bytes_ratio"] == pytest.approx(1.0)
    export(tmp_path / "run", tmp_path / "exp")
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["adaflex"]["methods"] == ["kv"] and cfg["adaflex"]["stages"][0]["plan"]["fractions"] == fr
    assert "attn_implementation" not in cfg or cfg["attn_implementation"] != "adaflex_kv"
    model, _ = load(tmp_path / "exp")
    assert model.adaflex.kv.fractions == fr
    x = torch.randint(0, 250, (1, 100))
    with torch.no_grad():
        c = model.adaflex.make_cache()
        model(x, cache=c, use_cache=True)
    counts = [layer.stored for layer in c.layers]
    # the shipped static plan decides each layer's size (floor: sinks + window = 10)
    assert counts == kv_alloc.plan_counts(fr, 100, total=200, min_keep=10).tolist()
    from_run, _ = load(tmp_path / "run")
    assert from_run.adaflex.kv.fractions == fr


def test_ci_recipe_searched_mix_plan_survives_export_and_load(tiny_dir, tmp_path):
    """recipes/ci/kv-tiny.yaml: searched static plan with the mix policy; export -> load -> generate()."""
    from adaflex.retrofit.recipe import load_recipe

    report = run(load_recipe("recipes/ci/kv-tiny.yaml"), str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["stages"][0]["plan"]
    fr, hf = plan["fractions"], plan.get("head_fractions")
    assert len(fr) == 4 and sum(fr) / 4 == pytest.approx(0.5, abs=0.01)
    assert report["kv_bytes_ratio"] == pytest.approx(0.5, abs=0.05)
    export(tmp_path / "run", tmp_path / "exp")
    model, _ = load(tmp_path / "exp")
    assert model.adaflex.kv.fractions == fr and model.adaflex.kv.policy.name == "mix"
    assert model.adaflex.kv.head_fractions == hf
    cache = model.adaflex.make_cache()
    out = model.generate(torch.randint(0, 250, (1, 120)), max_new_tokens=6, do_sample=False, pad_token_id=258,
                         cache=cache)
    assert out.shape[1] == 126
    # decoding keeps each layer's (each KV head's, with a per-head plan) size fixed
    if hf is None:
        expect = kv_alloc.plan_counts(fr, 120, total=240, min_keep=10).tolist()
        assert [layer.stored for layer in cache.layers] == expect
    else:
        expect = kv_alloc.plan_counts(np.ravel(hf), 120, total=480, min_keep=10).reshape(4, 2).tolist()
        assert [layer.head_lengths() for layer in cache.layers] == expect
        assert cache.stored_bytes() == sum(map(sum, expect)) * 2 * 16 * 4  # K and V, head_dim 16, fp32: no padding


def test_searched_allocation_fits_and_keeps_uniform_candidate(tiny_dir, text_file, tmp_path):
    report = run(_recipe(text_file, allocation="searched", trials=6, groups=2), str(tiny_dir), out=tmp_path / "run",
                 log=lambda m: None)
    m = report["stages"][0]
    assert "uniform" in m["candidates_nll"] and m["searched_nll"] <= min(m["candidates_nll"].values()) + 1e-9
    assert len(m["layer_gains"]) == 4 and np.shape(m["head_gains"]) == (4, 2)
    # candidates, the gains (one baseline + one per layer + one per KV head of the 4 layers), then what the coordinate
    # search has left of 6 trials
    assert m["evaluations"] <= len(m["candidates_nll"]) + 5 + 8 + 2


def test_search_plan_promotes_the_layer_whose_tokens_matter():
    """A calibration objective where only layer 2's kept share matters: its gain is the largest, measured with one
    layer at full cache on top of the mean, and the search starts from a plan giving it all its tokens."""
    from adaflex.retrofit.kv.apply import layer_gains, search_plan
    from adaflex.retrofit.kv.config import KVConfig

    class Objective:
        ctx, calls, budgets, heads = 100, 0, [], 1

        def __call__(self, fractions, budget=None):
            self.calls += 1
            self.budgets.append(budget)
            f = np.asarray(fractions) * ((budget or 0.25) * len(fractions) / np.sum(fractions))  # a plan's scaling
            return 3.0 - 0.5 * min(1.0, f[2]) - 0.01 * f.sum()

    obj = Objective()
    gains = layer_gains(obj, 0.25, 6)
    assert int(np.argmax(gains)) == 2 and obj.budgets[0] is None and obj.budgets[1] == pytest.approx(0.25 + 0.75 / 6)
    cfg = KVConfig(budget=0.25, allocation="searched", sinks=2, window=8, trials=6, groups=2)
    fractions, found = search_plan(Objective(), cfg, 6, 0.25, np.full(6, 0.25), np.full(6, 0.25))
    assert found["search_start"].startswith("top1@1") and fractions[2] == pytest.approx(fractions.max())
    assert found["searched_nll"] < found["candidates_nll"]["uniform"]


def test_search_plan_promotes_the_kv_head_whose_tokens_matter():
    """Only KV head 1 of layer 2 matters: head gains are measured in the layers of largest gain, the plan comes back
    per head [L, H] and gives that head its full cache."""
    from adaflex.retrofit.kv.apply import search_plan
    from adaflex.retrofit.kv.config import KVConfig

    class Objective:
        ctx, calls, heads = 100, 0, 2

        def __call__(self, fractions, budget=None):
            self.calls += 1
            f = np.asarray(fractions, dtype=float)
            f = np.repeat(f[:, None], 2, 1) if f.size == 6 else f.reshape(6, 2)  # per layer, or per head
            f = f * ((budget or 0.25) * f.size / f.sum())
            return 3.0 - 0.5 * min(1.0, f[2, 1]) - 0.01 * f.sum()

    cfg = KVConfig(budget=0.25, allocation="searched", sinks=2, window=8, trials=6, groups=2, head_gains=2)
    obj = Objective()
    fractions, found = search_plan(obj, cfg, 6, 0.25, np.full(6, 0.25), np.full(6, 0.25))
    heads = np.array(found["head_gains"])
    assert heads.shape == (6, 2) and np.argmax(heads) == 2 * 2 + 1
    assert np.count_nonzero(heads) <= 4  # two layers measured
    assert fractions.shape == (6, 2) and fractions[2, 1] == pytest.approx(1.0)
    assert found["search_start"].startswith("top") and fractions.mean() == pytest.approx(0.25)


def test_apply_refuses_a_head_plan_of_another_shape(tiny_dir):
    from adaflex.retrofit.errors import UsageError
    from adaflex.retrofit.kv.apply import apply
    from adaflex.retrofit.kv.config import KVConfig
    from adaflex.retrofit.kv.plan import KVPlan

    model, _ = load(tiny_dir)
    plan = KVPlan(num_layers=4, config=KVConfig(), fractions=None, head_fractions=[[0.25] * 3] * 4)
    with pytest.raises(UsageError, match=r"head_fractions has shape \(4, 3\), the model has 4 layers of 2 KV heads"):
        apply(model, plan)


def test_cli_passkey_and_flags(tiny_dir, text_file, tmp_path):
    run(_recipe(text_file, allocation="cake"), str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    for extra in ([], ["--query-agnostic"]):
        res = runner.invoke(app, ["eval", str(tmp_path / "run"), "--task", "passkey", "--data", str(text_file),
                                  "--context", "300", "--limit", "3", "--depths", "0.1,0.9", "--format", "json",
                                  *extra])
        assert res.exit_code == 0, res.stderr
        obj = json.loads(res.stdout)
        assert obj["task"] == "passkey" and obj["n"] == 3 and 0 <= obj["value"] <= 1
        assert obj["query_agnostic"] is bool(extra) and set(obj["by_depth"]) == {"0.1", "0.9"}
        assert obj["kv_bytes_ratio"] < 0.6
    res = runner.invoke(app, ["eval", str(tiny_dir), "--task", "passkey", "--data", str(text_file), "--context", "300",
                              "--depths", "0.1,2"])
    assert res.exit_code == 2 and "--depths" in res.stderr


@pytest.mark.parametrize("sets, needle", [
    (["kv.budget=0"], "budget"),
    (["kv.budget=1.5"], "budget"),
    (["kv.tokens=9"], "tokens"),
    (["kv.window=64"], "budget"),  # 0.5 x 80 calibration tokens < sinks + window
    (["kv.plan=[0.5,0.5,0.5]"], "plan"),
    (["kv.policy=tova"], "policy"),
])
def test_bad_input_is_one_line_exit_2(tiny_dir, text_file, tmp_path, sets, needle):
    import yaml

    recipe = tmp_path / "kv.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(text_file, allocation="uniform")))
    args = ["retrofit", str(tiny_dir), "--recipe", str(recipe), "--out", str(tmp_path / "r")]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = [x for x in res.stderr.strip().splitlines() if "error" in x or "Traceback" in x]
    # the budget-vs-calibration-length check needs the recipe's data, so it runs when the stage fits
    assert len(lines) == 1 and lines[0].startswith("adaflex: error:") and needle in lines[0], res.stderr
    assert "kv" in lines[0] and not (tmp_path / "r" / "plan.json").exists()


def test_plan_for_another_layer_count_is_refused(tiny):
    from adaflex.retrofit.kv.apply import apply
    from adaflex.retrofit.kv.plan import KVPlan
    from adaflex.retrofit.plan import read

    model, _ = tiny
    with pytest.raises(UsageError, match="num_layers"):
        apply(model, read(KVPlan, {"num_layers": 30, "config": {"budget": 0.25}, "fractions": None}, "plan"))
    with pytest.raises(UsageError, match=r"^plan.fractions: has 3 entries, num_layers is 4$"):
        read(KVPlan, {"num_layers": 4, "config": {"budget": 0.25}, "fractions": [0.25] * 3}, "plan")
