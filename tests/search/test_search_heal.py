"""`adaflex search --heal-top K` / `search.heal`: trials scored unhealed, the K best healed, the pick by healed
quality, best.yaml ending in the heal stage; resumed without healing twice; bad K refused in one line."""

from __future__ import annotations

import csv

import pytest
import yaml
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit.recipe import validate
from tiny import SHARED

pytestmark = pytest.mark.skipif(not (SHARED / "wikitext2_dev.txt").is_file(), reason="needs ../shared/data")

DATA = "../shared/data/wikitext2_dev.txt"
HEAL = {"train": ["norms", "head"], "loss": "kl", "tokens": 512, "batch_size": 2, "top_k": 16,
        "weights_lr": 0.01}


def raw_recipe(**heal) -> dict:
    return {
        "seed": 0,
        "data": {"calibration": {"path": DATA, "samples": 4, "seq_len": 64}},
        "stages": [{"drop": {"blocks": 1}}],
        "search": {"trials": 4, "quality": {"windows": 2}, "single_methods": False,
                   "stages": {"drop": {"enabled": True, "blocks": [1, 2]}},
                   "heal": {"settings": dict(HEAL), **heal}},
    }


def test_heal_top_picks_by_healed_quality_and_resumes(tiny_dir, tmp_path, one_thread, monkeypatch):
    from adaflex import study as driver
    from adaflex.retrofit import registry

    fits = []
    heal = type(registry.get("heal"))
    real_fit = heal.fit

    def counting(self, ctx, cfg):
        fits.append(ctx.index)
        return real_fit(self, ctx, cfg)

    monkeypatch.setattr(heal, "fit", counting)
    raw = raw_recipe(top=2)
    rec = validate(raw, "r.yaml")
    out = tmp_path / "out"
    summary = driver.search(rec, raw, str(tiny_dir), {"flops": 0.95}, out=out, show_progress=False,
                            log=lambda m: None)
    # the trials themselves ran unhealed: heal fitted only for the two distinct configurations healed
    assert len(fits) == 2
    healed = {h["trial"]: h for h in summary["healed"]}
    assert len(healed) == 2
    rows = list(csv.DictReader((out / "trials.csv").open()))
    unhealed = {int(r["number"]): float(r["quality"]) for r in rows
                if r["state"] == "COMPLETE" and r["feasible"] == "True"}
    distinct = sorted({q: n for n, q in sorted(unhealed.items(), reverse=True)}.items())  # first trial per value
    assert sorted(healed) == sorted(n for _, n in distinct[:2])  # the two best distinct, by unhealed quality
    for n, h in healed.items():
        assert h["unhealed"] == pytest.approx(unhealed[n]) and h["healed"] != pytest.approx(h["unhealed"])
    assert {int(r["number"]) for r in rows if r["healed_quality"]} == set(healed)
    # the pick is the best healed quality, not the best unhealed one
    pick = min(healed.values(), key=lambda h: h["healed"])
    best = summary["best"]
    assert best["trial"] == pick["trial"] and best["quality"]["value"] == pytest.approx(pick["healed"])
    assert best["unhealed"]["quality"] == pytest.approx(pick["unhealed"])
    assert [m for m, _ in best["stages"]] == ["drop", "heal"] and best["stages"][-1][1] == HEAL
    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    assert list(best_yaml["stages"][-1]) == ["heal"] and best_yaml["stages"][-1]["heal"] == HEAL
    validate(best_yaml, "best.yaml")

    # the same search again: nothing trained twice, the same pick
    fits.clear()
    again = driver.search(rec, raw, str(tiny_dir), {"flops": 0.95}, out=out, show_progress=False,
                          log=lambda m: None)
    assert fits == [] and again["best"]["trial"] == best["trial"]
    assert again["best"]["quality"]["value"] == pytest.approx(best["quality"]["value"])


def _search(tiny_dir, tmp_path, raw: dict, *args):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(app, ["search", str(tiny_dir), "--recipe", str(path), "--budget", "flops=0.95",
                                    "--out", str(tmp_path / "o"), *args])


@pytest.mark.parametrize("args,top,needle", [
    (["--trials", "3", "--heal-top", "4"], 0, "--heal-top 4: larger than the search's 3 trials"),
    ([], 5, "search.heal.top 5: larger than the search's 4 trials"),
])
def test_heal_top_larger_than_the_trials_is_one_line_exit_2(tiny_dir, tmp_path, args, top, needle):
    res = _search(tiny_dir, tmp_path, raw_recipe(top=top), *args)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not (tmp_path / "o").exists()


def test_bad_heal_settings_name_the_key(tiny_dir, tmp_path):
    raw = raw_recipe(top=1)
    raw["search"]["heal"]["settings"]["tokens"] = 0
    res = CliRunner().invoke(app, ["recipe", "validate", str(_write(tmp_path, raw))])
    assert res.exit_code == 2 and "search.heal.settings: tokens: 0 with train" in res.output, res.output


def _write(tmp_path, raw):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_pick_is_the_best_feasible_healed_quality():
    from adaflex.study.heal import best_healed

    def r(q, ok=True, flops=0.9):
        return {"quality": q, "feasible": ok, "cost": {"flops_ratio": flops}}

    # trial 1 was best unhealed; healing reverses the order; trial 3 healed best but went over budget
    assert best_healed({"1": r(5.0), "2": r(3.0), "3": r(1.0, ok=False), "4": {"quality": None}})[0] == 2
    assert best_healed({"1": r(3.0, flops=0.9), "2": r(3.0, flops=0.8)})[0] == 2  # a tie goes to the cheaper
    assert best_healed({"1": r(1.0, ok=False)}) is None
