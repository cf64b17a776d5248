"""`adaflex search` end to end on the tiny model: outputs, exit codes, storages, resume after SIGKILL/SIGINT,
and (when ADAFLEX_TEST_POSTGRES is set, as in CI) two workers sharing one PostgreSQL study."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny import ROOT

pytestmark = pytest.mark.shared_data  # recipes and quality text of ../shared/data (tests/conftest.py)

DATA = "../shared/data/wikitext2_dev.txt"
CHEAP = {  # prune + kv: no training, about a second a trial
    "seed": 0,
    "data": {"calibration": {"path": DATA, "samples": 4, "seq_len": 64}},
    "stages": [
        {"prune": {"sparsity": 0.3, "allocation": "uniform", "score": "wanda"}},
        {"kv": {"budget": 0.5, "allocation": "uniform", "policy": "snapkv", "sinks": 2, "window": 8, "kernel": 3}},
    ],
    "eval": [
        {"task": "perplexity", "data": DATA, "seq_len": 64, "limit": 2},
        {"task": "perplexity", "data": DATA, "context": 48, "continuation": 16, "limit": 2},  # through the cache
    ],
    "search": {
        "trials": 6,
        "quality": {"windows": 2},
        "stages": {
            "prune": {"sparsity": {"low": 0.1, "high": 0.5}, "allocation": ["uniform", "owl"]},
            "kv": {"budget": {"low": 0.3, "high": 1.0}},
        },
    },
}
SLOW = {  # prune + shards healing (a few seconds a trial): time to kill a worker mid-trial
    "seed": 0,
    "data": {"calibration": {"path": DATA, "samples": 4, "seq_len": 64}},
    "stages": [
        {"prune": {"sparsity": 0.3, "allocation": "uniform", "score": "wanda"}},
        {
            "shards": {
                "method": "mos",
                "rank": 4,
                "equivalent_rank": 2,
                "shards_per_vector": 4,
                "steps": 120,  # seconds a trial, so that a signal lands mid-trial (teacher logits are cached)
                "batch_size": 4,
                "teacher": "input",
            }
        },
    ],
    "search": {
        "trials": 4,
        "quality": {"windows": 2},
        "stages": {
            "prune": {"enabled": True, "sparsity": {"low": 0.1, "high": 0.5}},
            "shards": {"enabled": True, "rank": [4]},
        },
    },
}


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cmd(*args) -> list[str]:
    return [sys.executable, "-m", "adaflex.cli.main", *map(str, args)]


def slow_search(model, recipe, out, study, *extra) -> list[str]:
    """The command line of a search that the signal tests interrupt."""
    return cmd("search", model, "--recipe", recipe, "--budget", "params=0.5", "--out", out, "--study", study,
               "--format", "json", *extra)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "ADAFLEX_PROGRESS": "0"}


def adaflex(*args, timeout=600):
    return subprocess.run(cmd(*args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def load_study(storage, name):
    import optuna

    if isinstance(storage, str) and storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(storage.removeprefix("journal:")))
    return optuna.load_study(study_name=name, storage=storage)


def finished(study):
    from optuna.trial import TrialState

    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_search_end_to_end(tiny_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", CHEAP)
    out = tmp_path / "out"
    args = ("search", tiny_dir, "--recipe", recipe, "--budget", "flops=0.95", "--out", out, "--format", "json")
    r = adaflex(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    t = res["trials"]
    assert t["requested"] == 6 and t["complete"] + t["pruned"] == 6 and t["this_worker"] == 6
    best = res["best"]
    assert best["flops_ratio"] <= 0.95 and best["cost"]["flops_ratio"] == best["flops_ratio"]
    assert best["quality"]["metric"] == "perplexity" and best["quality"]["value"] > 1
    assert [next(iter(s)) for s in best["config"]] == [m for m, _ in best["stages"]]
    assert "kv" in [m for m, _ in best["stages"]]  # without a kv stage no trial meets flops=0.95
    # each feasible trial is a better-or-equal... the best is the lowest perplexity within budget
    import csv

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == t["total"]
    ok = [float(x["quality"]) for x in rows if x["state"] == "COMPLETE" and x["feasible"] == "True"]
    assert best["quality"]["value"] == pytest.approx(min(ok))
    assert all(float(x["flops_ratio"]) > 0.95 for x in rows if x["state"] == "COMPLETE" and x["feasible"] == "False")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "study.db").is_file()
    # best.yaml is a recipe that validates and runs
    assert res["recipe"] == str(out / "best.yaml")
    v = adaflex("recipe", "validate", out / "best.yaml")
    assert v.returncode == 0, v.stderr
    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    assert best_yaml["budget"] == {"flops": 0.95} and "search" not in best_yaml
    if res["best_single"]:  # the best single-method trial at the same or lower cost
        assert len(res["best_single"]["stages"]) == 1
        assert res["best_single"]["cost"]["flops_ratio"] <= best["flops_ratio"] + 1e-12
        assert adaflex("recipe", "validate", res["best_single"]["recipe"]).returncode == 0
    run = adaflex("retrofit", tiny_dir, "--recipe", out / "best.yaml", "--format", "json")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["kv_bytes_ratio"] < 1
    # the same command again continues the same study: nothing left to do, nothing redone; --evaluate then
    # holds dense, the best and the best single-method trial to the recipe's eval, models rebuilt in memory
    again = adaflex(*args, "--evaluate")
    assert again.returncode == 0, again.stderr[-2000:]
    res2 = json.loads(again.stdout)
    assert res2["trials"]["this_worker"] == 0 and res2["trials"]["total"] == t["total"]
    assert res2["best"]["trial"] == best["trial"]
    ev = {row["model"]: row for row in res2["evaluation"]}
    assert list(ev)[:2] == ["dense", f"trial-{best['trial']}"]
    single = res["best_single"]["trial"] if res["best_single"] else best["trial"]
    assert len(ev) == 1 + len({best["trial"], single})  # dense, the best, the best single method (once each)
    # the same numbers as retrofitting best.yaml from scratch (dense and retrofitted side by side)
    assert ev["dense"]["results"][0]["value"] == pytest.approx(report["evals"][0]["dense"]["value"], rel=1e-5)
    assert ev[f"trial-{best['trial']}"]["results"][0]["value"] == pytest.approx(report["value"], rel=1e-5)
    cont = [row["results"][1]["value"] for row in ev.values()]  # KV eviction shows in continuation perplexity
    assert cont[1] != pytest.approx(cont[0])
    assert cont[1] == pytest.approx(report["evals"][1]["retrofitted"]["value"], rel=1e-5)
    assert sorted(p.name for p in (out / "eval").iterdir())[0].startswith("dense-eval-")  # resumable per eval
    # more trials asked for: only the difference runs
    more = adaflex(*args[:-2], "--trials", 8, "--format", "json")
    assert more.returncode == 0, more.stderr[-2000:]
    res3 = json.loads(more.stdout)
    assert res3["trials"]["this_worker"] == 2 and res3["trials"]["complete"] + res3["trials"]["pruned"] == 8


def test_bad_budget_is_a_usage_error(tiny_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", CHEAP)
    for spec in ("flops=2", "speed=0.5", "abc"):
        r = adaflex("search", tiny_dir, "--recipe", recipe, "--budget", spec, "--out", tmp_path / "o")
        assert r.returncode == 2, (spec, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "--budget" in r.stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_without_eval_section_is_refused_before_searching(tiny_dir, tmp_path):
    no_eval = {k: v for k, v in CHEAP.items() if k != "eval"}
    recipe = write_recipe(tmp_path / "r.yaml", no_eval)
    r = adaflex("search", tiny_dir, "--recipe", recipe, "--budget", "flops=0.9", "--out", tmp_path / "o",
                "--evaluate")
    assert r.returncode == 2 and "--evaluate" in r.stderr and "eval:" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # no study was started


def test_bad_search_section_names_the_key(tiny_dir, tmp_path):
    bad = json.loads(json.dumps(CHEAP))
    bad["search"]["stages"]["prune"]["sparsity"] = {"low": 0.5, "high": 1.5}
    r = adaflex(
        "search",
        tiny_dir,
        "--recipe",
        write_recipe(tmp_path / "r.yaml", bad),
        "--budget",
        "0.9",
        "--out",
        tmp_path / "o",
    )
    assert r.returncode == 2 and "search.stages.prune.sparsity" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad["search"]["stages"] = {"prune": {"nonsense": [1, 2]}}
    r = adaflex("recipe", "validate", write_recipe(tmp_path / "r2.yaml", bad))
    assert r.returncode == 2 and "search.stages" in r.stderr and "nonsense" in r.stderr
    assert not (tmp_path / "o").exists()


def test_infeasible_budget_exits_3_with_the_cheapest_cost(tiny_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", CHEAP)
    r = adaflex("search", tiny_dir, "--recipe", recipe, "--budget", "flops=0.5", "--out", tmp_path / "o")
    assert r.returncode == 3, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "flops=0.5" in line and "cheapest" in line
    # kv at its lowest (0.3 of a 48-token context) is all this space can save: 4 blocks of 43008 linear MACs
    # plus 128 per cached token, and the head (16576)
    want = (4 * (43008 + 128 * 48 * 0.3) + 16576) / (4 * (43008 + 128 * 48) + 16576)
    assert f"flops={want:.6g}" in line
    assert not (tmp_path / "o").exists()


def _wait_running(study_fn, proc, min_done: int, timeout: float = 300, ready: Path | None = None):
    """Poll until `min_done` trials finished and one of `proc`'s trials has run for a moment."""
    from optuna.trial import TrialState

    t0 = time.time()
    seen = {}
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "worker ended"
        if ready is not None and not ready.is_file():  # let the worker create its storage first
            time.sleep(0.5)
            continue
        try:
            study = study_fn()
        except Exception:  # the study is not created yet
            time.sleep(0.5)
            continue
        trials = study.get_trials()
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        run = [
            t
            for t in trials
            if t.state == TrialState.RUNNING and (t.user_attrs.get("worker") or {}).get("pid") == proc.pid
        ]
        if len(done) >= min_done and run:
            n = run[0].number
            seen.setdefault(n, time.time())
            if time.time() - seen[n] > 1.0:
                return study, done, n
        time.sleep(0.3)
    raise AssertionError("the worker never got mid-trial")


def _check_resumed(study, before: list, killed: int, total: int):
    from optuna.trial import TrialState

    after = {t.number: t for t in study.get_trials()}
    for t in before:  # no completed trial lost or redone
        assert after[t.number].state == t.state and after[t.number].values == t.values
    assert after[killed].state == TrialState.FAIL
    retried = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == after[killed].params
    assert len(finished(study)) == total
    keys = [json.dumps(t.params, sort_keys=True) for t in finished(study)]
    assert len(set(keys)) == len(keys)  # no configuration run twice


def test_sigkill_then_restart_continues_the_study_journal(tiny_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", SLOW)
    storage = f"journal:{tmp_path / 'study.log'}"
    args = slow_search(tiny_dir, recipe, tmp_path / "o", "kill-test", "--storage", storage)
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        study, before, killed = _wait_running(lambda: load_study(storage, "kill-test"), proc, min_done=1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    r = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"trial {killed}: its worker (pid {proc.pid}) is gone" in r.stderr
    res = json.loads(r.stdout)
    assert res["storage"] == storage and res["trials"]["complete"] + res["trials"]["pruned"] == 4
    _check_resumed(load_study(storage, "kill-test"), before, killed, 4)


def test_sigint_exits_130_and_restart_continues(tiny_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", SLOW)
    out = tmp_path / "o"
    args = slow_search(tiny_dir, recipe, out, "int-test")
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the worker the default disposition, as a terminal would
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    storage = f"sqlite:///{out / 'study.db'}"
    try:
        study, before, interrupted = _wait_running(
            lambda: load_study(storage, "int-test"), proc, min_done=1, ready=out / "study.db"
        )
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert f"trial {interrupted}: interrupted; re-enqueued" in stderr
    assert (out / "trials.csv").is_file()  # finished work is written out
    r = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_resumed(load_study(storage, "int-test"), before, interrupted, 4)


def test_composed_pareto_search_on_the_quickstart_tiny_recipe(tiny_dir, tmp_path):
    out = tmp_path / "o"
    r = adaflex(
        "search",
        tiny_dir,
        "--recipe",
        "ci/quickstart-tiny.yaml",
        "--budget",
        "flops=0.8,kv=0.6",
        "--pareto",
        "--trials",
        6,
        "--out",
        out,
        "--format",
        "json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["pareto_mode"] and res["pareto_front"]
    import optuna

    study = load_study(f"sqlite:///{out / 'study.db'}", res["study"])
    assert len(study.directions) == 3  # perplexity, flops, kv
    front = [study.trials[n] for n in res["pareto_front"]]
    for t in front:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["feasible"]
        assert t.values[1] <= 0.8 and t.values[2] <= 0.6
    # the start of a new study: the recipe as written, then each method alone
    first = [sorted(m for m, _ in t.user_attrs["stages"]) for t in study.trials[:5]]
    assert first == [["kv", "prune", "routes", "shards"], ["prune"], ["shards"], ["routes"], ["kv"]]
    assert res["best"]["quality"]["value"] == min(t.values[0] for t in front)


@pytest.mark.skipif(not os.environ.get("ADAFLEX_TEST_POSTGRES"), reason="ADAFLEX_TEST_POSTGRES not set (CI sets it)")
def test_two_workers_share_one_postgres_study(tiny_dir, tmp_path):
    import optuna

    url = os.environ["ADAFLEX_TEST_POSTGRES"]
    name = f"two-workers-{os.getpid()}-{int(time.time())}"
    recipe = write_recipe(tmp_path / "r.yaml", CHEAP)
    procs = [
        subprocess.Popen(
            cmd(
                "search",
                tiny_dir,
                "--recipe",
                recipe,
                "--budget",
                "flops=0.95",
                "--trials",
                8,
                "--storage",
                url,
                "--study",
                name,
                "--out",
                tmp_path / f"w{i}",
                "--format",
                "json",
            ),
            cwd=ROOT,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
    study = load_study(url, name)
    done = finished(study)
    # the study's total, not 8 per worker; a trial that two workers started at the same moment past the total
    # fails at once as a surplus and is not counted
    assert len(done) == 8
    failed = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert all(t.user_attrs.get("reason", "").startswith("surplus") for t in failed)
    assert sum(r["trials"]["this_worker"] for r in results) == len(done)  # the workers' trials add up
    owners = {(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in done}
    assert {pid for _, pid in owners} <= {p.pid for p in procs}
    assert len({t.number for t in done}) == len(done) and len({t._trial_id for t in done}) == len(done)
    assert all(r["trials"]["total"] >= 8 for r in results)
