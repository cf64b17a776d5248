"""Issue 23: export never destroys user data; one writer per run directory; bad model inputs are one line; run
directories are portable (exported alike from any working directory, a changed data file reported)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adaflex.cli.main import app
from tiny import GENERATED, ROOT

runner = CliRunner()
WIKI = "../shared/data/wikitext2_dev.txt"
ARC = "../shared/data/arc_easy_validation.jsonl"
SMALL = {"data": {"calibration": {"path": "generated", "samples": 2, "seq_len": 32}, "generated": GENERATED},
         "stages": [{"drop": {"blocks": 1}}]}


def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaflex: error:"), res.stderr
    for n in needles:
        assert n in lines[0], (lines[0], n)


@pytest.fixture
def run_dir(tiny_dir, tmp_path):
    from adaflex.retrofit.pipeline import run

    run(SMALL, str(tiny_dir), out=tmp_path / "p" / "run")
    return tmp_path / "p" / "run"


def test_export_refuses_a_non_empty_folder(run_dir, tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "CANARY").write_text("mine")
    _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(keep)]), str(keep), "not empty")
    _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(keep), "--force"]), str(keep),
                    "not an adaflex export")
    assert (keep / "CANARY").read_text() == "mine"


def test_export_never_replaces_the_run_or_its_parent(run_dir):
    for target in (run_dir.parent, run_dir.parent.parent):
        for extra in ([], ["--force"]):
            _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(target), *extra]),
                            "run directory")
    assert (run_dir / "plan.json").is_file()


def test_force_replaces_an_earlier_export(run_dir, tmp_path):
    exp = tmp_path / "exp"
    assert runner.invoke(app, ["export", str(run_dir), "--out", str(exp)]).exit_code == 0
    _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(exp)]), "--force")
    (exp / "stale-extra").write_text("x")
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(exp), "--force"])
    assert res.exit_code == 0, res.stderr
    assert (exp / "model.safetensors").is_file() and not (exp / "stale-extra").exists()


def test_out_that_is_a_file(run_dir, tiny_dir, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(f)]), str(f))
    _one_line_error(runner.invoke(app, ["retrofit", str(tiny_dir), "--recipe", "ci/drop-tiny.yaml", "--out", str(f)]),
                    str(f))
    _one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(f / "sub")]), str(f / "sub"))
    assert f.read_text() == "mine"


def test_killed_export_temporaries_are_cleaned_on_next_start(run_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".exp.{dead.pid}.abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    (tmp_path / ".exp.old").mkdir()
    live = tmp_path / f".exp.{os.getpid() + 0}.x.tmp"  # our own pid: a previous call of this process, gone too
    live.mkdir()
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exp")) == []


# ---- one writer per run directory ----


def _holder(directory: Path) -> subprocess.Popen:
    code = ("import sys, time; from adaflex.retrofit import rundir; rundir.hold(sys.argv[1]); print('held', "
            "flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_at_once_and_crash_releases(tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        t0 = time.monotonic()
        res = runner.invoke(app, ["retrofit", str(tiny_dir), "--recipe", "ci/drop-tiny.yaml", "--out", str(out)])
        took = time.monotonic() - t0
        _one_line_error(res, str(out), f"pid {proc.pid}")
        assert took < 1.0, took
        res = runner.invoke(app, ["search", str(tiny_dir), "--recipe", "ci/quickstart-tiny.yaml", "--budget", "0.9",
                                  "--out", str(out)])
        _one_line_error(res, f"pid {proc.pid}")
    finally:
        proc.kill()  # a crash: the kernel drops the lock with the process
        proc.wait()
    from adaflex.retrofit import rundir

    rundir.hold(out)
    rundir.release(out)
    assert not any(out.iterdir())  # the lock writes nothing into the directory


@pytest.mark.slow
def test_two_concurrent_retrofits_into_one_out(tiny_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "adaflex.cli.main", "retrofit", str(tiny_dir), "--recipe", "ci/drop-tiny.yaml",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from adaflex.retrofit import rundir

    deadline = time.monotonic() + 120
    while not (out.is_dir() and rundir.holder(out) == str(first.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first finished before the second started: no concurrency tested"
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-2000:]
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1


# ---- bad model inputs ----


def test_typo_model_name_fails_at_once_with_a_suggestion(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    res = runner.invoke(app, ["eval", "smollm2-135", "--task", "mc", "--data", ARC])
    assert time.monotonic() - t0 < 5
    _one_line_error(res, "smollm2-135", "did you mean 'smollm2-135m'")


def test_corrupt_safetensors_names_the_file(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(runner.invoke(app, ["retrofit", str(bad), "--recipe", "ci/drop-tiny.yaml"]), str(weights))
    weights.write_bytes(b"\x00" * 64)
    _one_line_error(runner.invoke(app, ["eval", str(bad), "--task", "perplexity", "--data", WIKI]), str(weights))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_bin_refused_in_one_line_and_allow_bin_on_retrofit(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil"
    shutil.copytree(tiny_dir, evil)
    (evil / "model.safetensors").unlink()
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil()))
    recipe = str(ROOT / "recipes" / "ci" / "drop-tiny.yaml")
    res = runner.invoke(app, ["retrofit", str(evil), "--recipe", recipe])
    assert res.exit_code == 2, res.stderr  # data paths are relative to ROOT: refused before the model anyway
    monkeypatch.chdir(ROOT)
    _one_line_error(runner.invoke(app, ["retrofit", str(evil), "--recipe", recipe]), "--allow-bin")
    _one_line_error(runner.invoke(app, ["retrofit", str(evil), "--recipe", recipe, "--allow-bin"]), str(evil))
    assert not (tmp_path / "PWNED").exists() and not (ROOT / "PWNED").exists()


def test_empty_calibration_file(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = runner.invoke(app, ["retrofit", str(tiny_dir), "--recipe", "ci/drop-tiny.yaml", "--set",
                              f"data.calibration.path={empty}"])
    _one_line_error(res, str(empty), "data.calibration")


# ---- portable run directories ----


def _content(path: Path):
    """Bytes, except safetensors: their header's metadata order varies between writes (a Rust HashMap)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_run_dir_exports_alike_from_anywhere_and_reports_changed_data(tiny_dir, tmp_path, monkeypatch):
    from adaflex.retrofit.pipeline import run

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "data").mkdir(parents=True)
    b.mkdir()
    shutil.copytree(tiny_dir, a / "model")
    (a / "data" / "wiki.txt").write_text((ROOT / WIKI).read_text()[:20000])
    recipe = {"data": {"calibration": {"path": "data/wiki.txt", "samples": 2, "seq_len": 32}},
              "stages": [{"drop": {"blocks": 1}}]}
    monkeypatch.chdir(a)
    run(recipe, "model", out="run")
    import json

    inputs = json.loads((a / "run" / "inputs.json").read_text())
    assert inputs["data"]["data/wiki.txt"]["path"] == str(a / "data" / "wiki.txt")
    assert len(inputs["data"]["data/wiki.txt"]["sha256"]) == 64
    assert runner.invoke(app, ["export", "run", "--out", str(tmp_path / "e1")]).exit_code == 0
    monkeypatch.chdir(b)
    res = runner.invoke(app, ["export", str(a / "run"), "--out", str(tmp_path / "e2")])
    assert res.exit_code == 0, res.stderr
    files = sorted(p.name for p in (tmp_path / "e1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "e2").iterdir())
    for name in files:
        assert _content(tmp_path / "e1" / name) == _content(tmp_path / "e2" / name), name
    (a / "data" / "wiki.txt").write_text("changed " * 3000)
    res = runner.invoke(app, ["export", str(a / "run"), "--out", str(tmp_path / "e3")])
    assert res.exit_code == 0 and "changed since this run read it" in res.stderr, res.stderr
    monkeypatch.chdir(a)
    (a / "run" / "plan.json").unlink()  # an unfinished run must re-read its data: a changed file is an error
    from adaflex.retrofit.errors import UsageError

    with pytest.raises(UsageError, match="changed since this run started"):
        run(recipe, "model", out="run")
