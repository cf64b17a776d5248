"""The method contract, for every registered method (a method added later is covered without a new test):
fit -> apply -> run dir -> `load(run_dir)` -> export -> `load(export)`, the logits equal at each step.

Each method supplies settings for the tiny model through `Method.contract_config()` (retrofit/method.py); a
method without them fails here. Logits are those of a prefill and greedy decoding steps through the model's
own cache (tiny.generated_logits), so runtime parts are compared too."""

from __future__ import annotations

import json

import pytest
import torch

import adaflex.retrofit as af
from adaflex.retrofit import registry
from tiny import GENERATED, generated_logits

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs back home across the field. " * 2


def logits_of(model, tok) -> torch.Tensor:
    return generated_logits(model, tok, PROMPT)


def recipe_for(method) -> dict:
    try:
        settings = method.contract_config()
    except NotImplementedError as e:
        pytest.fail(f"{method.name}: {e} (implement Method.contract_config, see retrofit/method.py)")
    return {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 64},
                                "generated": GENERATED},
            "stages": [{method.name: settings}]}


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_fit_apply_run_dir_load_export_reload(name, tiny_dir, tmp_path, one_thread):
    method = registry.get(name)
    recipe = recipe_for(method)
    model, tok = af.load(str(tiny_dir))
    dense = logits_of(model, tok)

    # fit and apply in place (what `adaflex retrofit` does), writing the run directory
    af.run(recipe, model, tok, model_name=str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    fitted = logits_of(model, tok)
    assert fitted.shape == dense.shape
    assert not torch.equal(fitted, dense), f"{name}: the contract settings leave the model unchanged"

    assert_plans_round_trip(tmp_path / "run" / "plan.json")

    restored, rtok = af.load(str(tmp_path / "run"))
    torch.testing.assert_close(logits_of(restored, rtok), fitted, rtol=0, atol=1e-5)

    af.export(tmp_path / "run", tmp_path / "export")
    assert_plans_round_trip(tmp_path / "export" / "config.json", "adaflex")
    reloaded, etok = af.load(str(tmp_path / "export"))
    torch.testing.assert_close(logits_of(reloaded, etok), fitted, rtol=0, atol=1e-5)


def assert_plans_round_trip(path, block: str | None = None) -> None:
    """Each stored stage plan validates through its method's typed plan and dumps back to the same JSON (same keys,
    order and values): what a run writes does not change by passing through `Method.plan`."""
    obj = json.loads(path.read_text())
    for i, st in enumerate((obj[block] if block else obj)["stages"]):
        method = registry.get(st["method"])
        typed = method.plan.model_validate(st["plan"])
        assert json.dumps(typed.dump()) == json.dumps(st["plan"]), f"{path}: stages.{i} ({st['method']})"
        assert json.dumps(method.read_plan(st["plan"], str(path)).dump()) == json.dumps(st["plan"])


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_every_method_has_a_typed_plan(name):
    from adaflex.retrofit.plan import Plan

    plan = registry.get(name).plan
    assert isinstance(plan, type) and issubclass(plan, Plan), f"{name}: Method.plan must subclass retrofit.plan.Plan"
    assert plan.model_config.get("extra") == "forbid"


def test_a_method_without_contract_settings_fails_the_contract():
    from adaflex.retrofit.method import Method

    class Bare(Method):
        name = "bare"

    with pytest.raises(pytest.fail.Exception, match="bare: .*contract_config"):
        recipe_for(Bare())


def test_the_registry_holds_each_name_once():
    with pytest.raises(ValueError, match="drop"):
        registry.registry_of([registry.get("drop"), registry.get("drop")])


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_check_recipe_accepts_the_method_alone_and_names_where(name):
    # every method passes its own one-stage recipe; a refusal would have to name `where`
    method = registry.get(name)
    cfg = registry.config_class(name).model_validate(method.contract_config())
    method.check_recipe(cfg, 0, [name], f"r.yaml: stages.0.{name}")


def test_check_recipe_runs_at_validate_time_for_every_stage(monkeypatch):
    from adaflex.retrofit import checks
    from adaflex.retrofit.errors import UsageError
    from adaflex.retrofit.recipe import validate

    seen = []

    def refuse(self, config, index, methods, where):
        seen.append((index, tuple(methods), where))
        if index == 0:
            raise UsageError(f"{where}: refused by position")

    monkeypatch.setattr(type(registry.get("drop")), "check_recipe", refuse)
    rec = validate({"stages": [{"drop": {"blocks": 1}}, {"drop": {"blocks": 1}}]})
    with pytest.raises(UsageError, match=r"^r.yaml: stages.0.drop: refused by position$"):
        checks.stage_order(rec, "r.yaml")
    assert seen == [(0, ("drop", "drop"), "r.yaml: stages.0.drop")]
