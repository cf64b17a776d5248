"""The search space of a recipe, the cost of stage settings and plans, and the per-stage report of retrofit."""

from __future__ import annotations

import pytest

from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.recipe import load_recipe, packaged, read_yaml, validate
from adaflex.retrofit.search_space import build
from adaflex.search.cost import Shape
from adaflex.study.cost import setting_of

pytestmark = pytest.mark.shared_data  # recipes and quality text of ../shared/data (tests/conftest.py)

TINY = Shape(
    num_layers=4, hidden_size=64, intermediate_size=160, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=259
)


def quick(**search) -> dict:
    raw = read_yaml(packaged("ci/quickstart-tiny.yaml"))
    raw["search"] = search
    return raw


def test_space_of_the_quickstart_tiny_recipe():
    spaces = build(load_recipe(packaged("ci/quickstart-tiny.yaml")), 4)
    assert [s.method for s in spaces] == ["prune", "shards", "routes", "kv"]
    by = {s.method: s for s in spaces}
    assert all("enabled" in s.knobs for s in spaces)
    p = by["prune"].knobs
    assert (p["sparsity"].low, p["sparsity"].high) == (0.1, 0.5) and p["allocation"].choices == ("uniform", "owl")
    assert by["routes"].knobs["max_executed"].integer and by["routes"].knobs["max_executed"].corners() == [2, 4]
    assert "rank" not in by["shards"].knobs and by["shards"].base["rank"] == 4  # one choice: fixed
    # settings of a trial: the recipe's stage settings with the sampled values on top
    assert by["kv"].settings({"budget": 0.4, "enabled": True})["budget"] == 0.4
    assert by["kv"].settings({"budget": 0.4})["window"] == 8


def test_default_knobs_drop_what_the_stage_rejects():
    raw = quick()
    raw["stages"][0]["prune"] = {"sparsity": 0.5, "allocation": "dp", "allow_drop": True}
    spaces = {s.method: s for s in build(validate(raw), 4)}
    # allow_drop needs allocation dp: the uniform and owl defaults are left out, so allocation stays dp
    assert "allocation" not in spaces["prune"].knobs
    assert spaces["routes"].knobs["max_executed"].corners() == [2, 4]  # [L/2, L] by default
    assert spaces["kv"].knobs["allocation"].choices == ("uniform", "pyramid", "cake")


def test_explicit_knobs_must_validate():
    raw = quick(stages={"prune": {"allocation": ["uniform", "owl"], "allow_drop": True}})
    raw["stages"][0]["prune"]["allocation"] = "dp"
    with pytest.raises(UsageError, match=r"search\.stages\.prune\.allocation: 'uniform' rejected"):
        build(validate(raw), 4)
    with pytest.raises(UsageError, match=r"search\.stages\.kv\.budget"):
        build(validate(quick(stages={"kv": {"budget": {"low": 0.5, "high": 2.0}}})), 4)
    with pytest.raises(UsageError, match=r"search\.stages"):
        validate(quick(stages={"prune": {"nonsense": 1}}))
    with pytest.raises(UsageError, match=r"unknown method 'speed'"):
        validate(quick(stages={"speed": {}}))


def test_stages_in_and_out_of_the_search():
    spaces = build(
        validate(quick(stages={"kv": False, "drop": {"blocks": {"low": 1, "high": 2}}, "shards": {"enabled": True}})), 4
    )
    assert [s.method for s in spaces] == ["drop", "prune", "shards", "routes"]
    by = {s.method: s for s in spaces}
    assert by["drop"].knobs["blocks"].corners() == [1, 2] and by["drop"].base == {"blocks": 1}
    assert by["shards"].fixed_on and "enabled" not in by["shards"].knobs
    # fixed values replace the recipe's
    spaces = build(validate(quick(stages={"prune": {"allocation": "owl", "sparsity": 0.25}})), 4)
    assert spaces[0].base["allocation"] == "owl" and spaces[0].base["sparsity"] == 0.25
    assert "sparsity" not in spaces[0].knobs


def _cfgs(raw_stages):
    rec = validate({"stages": raw_stages})
    return [(m, c, None, {}) for m, c in rec.stage_items()]


def test_predicted_setting_spends_each_allowance():
    stages = _cfgs(
        [
            {"prune": {"sparsity": 0.5, "allocation": "dp", "allow_drop": True}},
            {"shards": {"method": "mos", "rank": 4, "equivalent_rank": 2}},
            {"routes": {"max_executed": 3}},
            {"kv": {"budget": 0.5}},
        ]
    )
    s = setting_of(stages, TINY, 100)
    assert s.removed_blocks == 2 and s.sparsity == 0.0  # every pruned weight in removed blocks (best case)
    assert s.executed == 2.0  # max_executed 3 of the 2 blocks left: each runs once
    assert s.kv_fraction == 0.5
    assert s.adapter_params == 2 * 2 * 1120 and s.adapter_macs == 4 * 1120  # e x blocks x (d_in + d_out)
    plain = setting_of(_cfgs([{"prune": {"sparsity": 0.4}}, {"routes": {"max_executed": 3}}]), TINY, 100)
    assert plain.removed_blocks == 0 and plain.sparsity == 0.4 and plain.executed == 3.0


def test_setting_from_plans():
    rec = validate({"stages": [{"prune": {"sparsity": 0.5}}, {"routes": {"max_executed": 3}}]})
    (pm, pc), (rm, rc) = rec.stage_items()
    from adaflex.retrofit.prune.plan import Linear, PrunePlan
    from adaflex.retrofit.routes.plan import RoutesPlan

    # the cost rules' keys alone (model_construct: no validation of the rest)
    prune_plan = PrunePlan.model_construct(removed=[1], linears=[
        Linear.model_construct(shape=[4, 4], sparsity=0.25, removed=False),
        Linear.model_construct(shape=[4, 8], sparsity=0.5, removed=False),
        Linear.model_construct(shape=[8, 8], removed=True, sparsity=1.0),
    ])
    routes_plan = RoutesPlan.model_construct(policy="routers")
    s = setting_of(
        [(pm, pc, prune_plan, {}), (rm, rc, routes_plan, {"calibrated_executed_mean": 2.25})], TINY, 100
    )
    assert s.removed_blocks == 1 and s.sparsity == pytest.approx((16 * 0.25 + 32 * 0.5) / 48)
    assert s.executed == 2.25


def test_retrofit_reports_each_stage(tiny_dir, tmp_path, one_thread):
    from adaflex.retrofit import run

    out = tmp_path / "run"
    report = run(packaged("ci/quickstart-tiny.yaml"), str(tiny_dir), out=out, log=lambda m: None)
    after = report["after_each_stage"]
    assert [a["stage"] for a in after] == ["dense", "prune", "shards", "routes", "kv"]
    d, pr, sh, ro, kv = after
    assert d["flops_ratio"] == 1.0 and d["sparsity"] == 0.0
    assert pr["sparsity"] == pytest.approx(0.3, abs=0.01) and pr["trainable_params"] == 0
    assert sh["trainable_params"] > 0
    assert ro["layers_executed_mean"] < 4 and ro["flops_ratio"] < 1
    assert kv["kv_bytes_ratio"] < ro["kv_bytes_ratio"]
    for k in ("flops_ratio", "kv_bytes_ratio", "layers_executed_mean", "sparsity"):
        assert kv[k] == pytest.approx(report["retrofitted"][k])
    assert all(a["perplexity"] > 1 for a in after)
    again = run(packaged("ci/quickstart-tiny.yaml"), str(tiny_dir), out=out, log=lambda m: None)
    assert again["after_each_stage"] == after  # resumed from the run directory


def test_a_configuration_proposed_again_is_answered_without_refitting(tiny_dir, tmp_path, one_thread, monkeypatch):
    """Two configurations only, six trials: the sampler must repeat; repeats copy the finished trial's result."""
    from adaflex import study as driver

    data = "../shared/data/wikitext2_dev.txt"
    raw = {
        "seed": 0,
        "data": {"calibration": {"path": data, "samples": 4, "seq_len": 64}},
        "stages": [{"prune": {"sparsity": 0.3, "allocation": "uniform", "score": "wanda"}}],
        "search": {"trials": 6, "quality": {"windows": 2}, "single_methods": False,
                   "stages": {"prune": {"enabled": True, "sparsity": [0.2, 0.3], "allocation": "uniform"}}},
    }
    fits = []
    real = driver.Session.apply_stages

    def counting(self, model, recipe, tmp):
        fits.append(recipe.stages[0].model_dump(mode="json"))
        return real(self, model, recipe, tmp)

    monkeypatch.setattr(driver.Session, "apply_stages", counting)
    rec = validate(raw, "r.yaml")
    summary = driver.search(rec, raw, str(tiny_dir), {"params": 0.5}, out=tmp_path / "out",
                            show_progress=False, log=lambda m: None)
    assert summary["trials"]["complete"] == 6
    import optuna

    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    dup = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(fits) == 6 - len(dup) <= 2  # one fit per distinct configuration
    for t in dup:
        first = study.trials[t.user_attrs["duplicate_of"]]
        assert t.user_attrs["stages"] == first.user_attrs["stages"] and t.value == first.value
        assert t.user_attrs["cost"] == first.user_attrs["cost"]


def test_a_trial_started_past_the_studys_total_fails_as_surplus():
    """Two workers that check the count at the same moment both start the last trial; the storage numbers them
    apart, and the one past the total fails at once (not counted) instead of running."""
    import types

    import optuna

    from adaflex.study.loop import _suppress_optuna_noise
    from adaflex.study.session import Session, Surplus

    _suppress_optuna_noise()
    study = optuna.create_study()
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(value=1.0))
    fake = types.SimpleNamespace(total=2, current=None)
    study.optimize(lambda t: Session.objective(fake, t), n_trials=1, catch=(Surplus,))
    last = study.trials[-1]
    assert last.state == optuna.trial.TrialState.FAIL and last.user_attrs["reason"].startswith("surplus")
    fake.total = 3  # room for one more (the failed surplus does not count): the objective goes past the check
    with pytest.raises(AttributeError, match="sample"):
        study.optimize(lambda t: Session.objective(fake, t), n_trials=1)


def test_search_drives_the_searched_kv_allocation(tiny_dir, tmp_path, one_thread):
    """`adaflex search` can vary the kv stage's allocation to `searched`: such a trial fits the plan on the recipe's
    calibration windows (gains, candidates, coordinate search) and its cache holds the budget."""
    from adaflex import study as driver

    raw = {
        "seed": 0,
        "data": {"calibration": {"path": "../shared/data/wikitext2_dev.txt", "samples": 3, "seq_len": 64}},
        "stages": [{"kv": {"budget": 0.5, "allocation": "uniform", "policy": "mix", "sinks": 2, "window": 8,
                           "kernel": 3, "trials": 4, "groups": 2}}],
        "search": {"trials": 4, "quality": {"windows": 2}, "single_methods": False,
                   "stages": {"kv": {"enabled": True, "budget": 0.5, "allocation": ["uniform", "searched"]}}},
    }
    summary = driver.search(validate(raw, "r.yaml"), raw, str(tiny_dir), {"kv": 0.6}, out=tmp_path / "out",
                            show_progress=False, log=lambda m: None)
    import optuna

    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    searched = [t for t in done if t.user_attrs["stages"][0][1]["allocation"] == "searched"]
    assert searched and [t for t in done if t not in searched]  # both allocations were tried
    for t in searched:
        met = t.user_attrs["stage_metrics"][0]
        assert met["allocation"] == "searched" and met["evaluations"] > 4 and met["search_start"]
        assert t.user_attrs["measured"]["kv_bytes_ratio"] == pytest.approx(0.5, abs=0.06)
