"""Data sources (retrofit/sources.py): files, Parquet/Arrow, hf: datasets from a local layout, generated text and its
cache, one RunData per run, and the fidelity task. Nothing here needs ../shared or the hub."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from adaflex.cli.main import app
from adaflex.retrofit import generated as gen
from adaflex.retrofit import sources
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.recipe import validate
from adaflex.retrofit.sources import RunData

SMALL = {"sequences": 4, "test_sequences": 2, "tokens": 40, "batch_size": 4}
ARC = [{"question": f"What is {i} plus one?", "choices": {"text": [str(i + 1), str(i + 7)], "label": ["A", "B"]},
        "answerKey": "A"} for i in range(6)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _recipe(**data):
    return validate({"data": {"generated": SMALL, **data}})


def _one_line(err: Exception, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


# ---- the forms ----


def test_text_jsonl_and_multiple_choice_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text here")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ("one", "two")))
    (tmp_path / "arc.jsonl").write_text("\n".join(json.dumps(r) for r in ARC))
    d = RunData()
    assert d.text(str(tmp_path / "a.txt")) == "plain text here"
    assert d.text(str(tmp_path / "b.jsonl")) == "one\n\ntwo"
    src = d.get(str(tmp_path / "arc.jsonl"))
    assert src.layout == "arc" and len(src.mc()) == 6 and src.mc(2)[1].choices == (" 2", " 8")
    assert "What is 0 plus one?" in src.text()


def test_parquet_and_arrow_through_datasets(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ARC)
    ds.to_parquet(str(tmp_path / "arc.parquet"))
    text = datasets.Dataset.from_dict({"text": ["first row", "second row"]})
    text.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    d = RunData()
    assert d.get(str(tmp_path / "arc.parquet")).layout == "arc"
    assert d.mc(str(tmp_path / "arc.parquet"), limit=3)[2].context == "Question: What is 2 plus one?\nAnswer:"
    assert d.text(str(arrow)) == "first row\n\nsecond row"


def test_unreadable_parquet_is_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(UsageError) as e:
        RunData().get(str(bad), where="eval.0.data")
    _one_line(e.value, "eval.0.data", str(bad), "Parquet")


def test_hf_from_a_local_dataset_folder_and_save_to_disk(tmp_path):
    import datasets

    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in ARC))
    (folder / "train.jsonl").write_text(json.dumps(ARC[0]))
    d = RunData()
    src = d.get(f"hf:{folder}:test")
    assert src.layout == "arc" and len(src.mc()) == 6
    assert src.record["hf"] == str(folder) and src.record["fingerprint"]
    # a dataset of one line per row (wikitext's layout) joins as written
    datasets.Dataset.from_dict({"text": [" = Title = \n", "\n", " body line\n"]}).save_to_disk(str(tmp_path / "wt"))
    assert d.text(f"hf:{tmp_path / 'wt'}") == " = Title = \n\n body line\n"
    with pytest.raises(UsageError) as e:
        d.get(f"hf:{folder}")  # two splits: which one?
    _one_line(e.value, "test", "train", "SPLIT")


def test_hf_offline_and_not_cached_names_the_id_and_the_way_out():
    with pytest.raises(UsageError) as e:
        RunData().get("hf:wikitext/wikitext-2-raw-v1:test", where="eval.0.data")
    _one_line(e.value, "eval.0.data", "hf:wikitext/wikitext-2-raw-v1:test", "offline", "HF_DATASETS_CACHE",
              "local file")


@pytest.mark.parametrize("value,needle", [("hf:", "expected hf:NAME"), ("hf:a//b", "expected hf:NAME"),
                                          ("generated:dev", "generated:test"), ("nope/missing.txt", "no such file")])
def test_recipe_load_checks_the_syntax(value, needle):
    with pytest.raises(UsageError) as e:
        validate({"eval": [{"task": "perplexity", "data": value}]})
    _one_line(e.value, "eval.0.data", needle)


def test_recipe_accepts_every_form(tmp_path):
    rec = validate({"data": {"calibration": {"path": "generated"}},
                    "eval": [{"task": "fidelity", "data": "generated:test"},
                             {"task": "perplexity", "data": "hf:wikitext/wikitext-2-raw-v1:test"}],
                    "stages": [{"routes": {"train": ["generated", "hf:org/name:train"]}}]})
    keys = [k for k, _, _ in sources.named_sources(rec)]
    assert keys == ["data.calibration.path", "eval.0.data", "eval.1.data", "stages.0.routes.train.0",
                    "stages.0.routes.train.1"]


# ---- generated text ----


def test_generated_needs_the_model_and_respects_its_positions(tiny):
    model, tok = tiny
    with pytest.raises(UsageError) as e:
        RunData(_recipe()).get("generated", where="data.calibration.path")
    _one_line(e.value, "data.calibration.path", "dense model")
    with pytest.raises(UsageError) as e:
        RunData(_recipe(generated={"tokens": 4096})).bind(model, tok).get("generated", where="eval.0.data")
    _one_line(e.value, "data.generated.tokens", "max_position_embeddings")
    with pytest.raises(UsageError) as e:
        validate({"data": {"generated": {"tokens": 0}}})
    _one_line(e.value, "data.generated.tokens")


def test_generated_is_cached_per_model_seed_and_settings(tiny, monkeypatch, one_thread):
    model, tok = tiny
    calls = []
    real = gen.sample
    monkeypatch.setattr(gen, "sample", lambda *a, **k: calls.append(a[2]["seed"]) or real(*a, **k))
    said = []
    first = RunData(_recipe()).bind(model, tok, said.append).get("generated")
    assert len(said) == 1 and "generated: the dense model writes 4 sequences" in said[0], said
    assert len(calls) == 1 and len(first.ids) == 4 and all(len(r) == s + 40 for r, s in zip(first.ids, first.starts))
    again = RunData(_recipe()).bind(model, tok, said.append).get("generated")
    assert len(calls) == 1 and len(said) == 1, "a second resolve reads the cache, silently"
    assert again.text() == first.text() and all(torch.equal(a, b) for a, b in zip(again.ids, first.ids))
    other = RunData(validate({"seed": 5, "data": {"generated": SMALL}})).bind(model, tok).get("generated")
    assert len(calls) == 2 and other.text() != first.text()
    test = RunData(_recipe()).bind(model, tok).get("generated:test")
    assert len(calls) == 3 and len(test.ids) == 2
    assert not set(test.text().split("\n\n")) & set(first.text().split("\n\n")), "held-out text differs"
    assert first.record["cache_key"] != test.record["cache_key"]
    assert (gen.cache_path(first.record["cache_key"])).is_file()
    # another model (other weights) is another cache entry
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    RunData(_recipe()).bind(model, tok).get("generated")
    assert len(calls) == 4


# ---- one RunData per run ----


def test_a_run_reads_each_source_once(tiny_dir, tmp_path, monkeypatch, one_thread):
    from adaflex.retrofit.pipeline import run

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 97} and more text {i}." for i in range(3000)))
    count: dict[str, int] = {}
    real = sources.load_file
    monkeypatch.setattr(sources, "load_file",
                        lambda spec, layout: count.__setitem__(spec.raw, count.get(spec.raw, 0) + 1)
                        or real(spec, layout))
    recipe = {"seed": 0, "data": {"calibration": {"path": str(text), "samples": 3, "seq_len": 48}},
              "stages": [{"drop": {"blocks": 1}}, {"prune": {"sparsity": 0.2}}],
              "eval": [{"task": "perplexity", "data": str(text), "seq_len": 48, "limit": 2},
                       {"task": "fidelity", "data": str(text), "seq_len": 48, "limit": 2}]}
    report = run(recipe, str(tiny_dir), out=tmp_path / "run", log=lambda m: None)
    # preflight, the probe, both evaluations (dense and retrofitted), the contribution tracker, the stages
    assert count == {str(text): 1}
    assert len(report["after_each_stage"]) == 3
    inputs = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert inputs["data"][str(text)]["sha256"]


def test_fidelity_of_the_same_model_is_exact_and_a_change_shows(tiny, tmp_path, one_thread):
    from adaflex.retrofit.evaluate import run_eval

    model, tok = tiny
    data = RunData(_recipe()).bind(model, tok)
    src = data.get("generated:test")
    ref = tmp_path / "fidelity.safetensors"
    dense = run_eval(model, tok, "fidelity", "generated:test", source=src, reference=ref)
    assert ref.is_file() and dense["kl"] == 0 and dense["top1_agreement"] == 1.0 and dense["reference"] == "self"
    same = run_eval(model, tok, "fidelity", "generated:test", source=src, reference=ref)
    assert same["reference"] == "dense" and abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert same["value"] == pytest.approx(dense["value"], rel=1e-5)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    changed = run_eval(model, tok, "fidelity", "generated:test", source=src, reference=ref)
    assert changed["kl"] > 1e-4 and changed["top1_agreement"] < 1.0
    other = data.get("generated")
    with pytest.raises(UsageError) as e:
        run_eval(model, tok, "fidelity", "generated", source=other, reference=ref)
    _one_line(e.value, str(ref), "other text")


def test_kl_top1_against_the_full_kl():
    from adaflex.retrofit.evaluate.fidelity import kl_top1

    p = torch.log_softmax(torch.randn(5, 300), -1)
    q = torch.log_softmax(torch.randn(5, 300), -1)
    top, idx = p.topk(128, -1)
    kl, agree = kl_top1(top, idx, q)
    full = (p.exp() * (p - q)).sum(-1)
    assert torch.all(kl <= full + 1e-5) and torch.all(kl > 0)  # the tail bin: a lower bound of the full KL
    kl_all, _ = kl_top1(*p.topk(300, -1), q)
    assert torch.allclose(kl_all, full, atol=1e-5)
    assert torch.equal(agree, q.argmax(-1) == p.argmax(-1))


# ---- the CLI ----


def test_retrofit_eval_adds_real_tasks_and_records_inputs(tiny_dir, tmp_path, monkeypatch, one_thread):
    arc = tmp_path / "arc.jsonl"
    arc.write_text("\n".join(json.dumps(r) for r in ARC))
    out = tmp_path / "run"
    loads = []
    real = sources.load_file
    monkeypatch.setattr(sources, "load_file", lambda spec, layout: loads.append(spec.raw) or real(spec, layout))
    res = CliRunner().invoke(app, ["retrofit", str(tiny_dir), "--recipe", "ci/drop-tiny.yaml", "--out", str(out),
                                   "--eval", str(arc), "--eval-limit", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert loads == [str(arc)], "the CLI's --eval, its checks and the run share one read"
    report = json.loads((out / "report.json").read_text())
    names = [(e["task"], e["dense"]["n"]) for e in report["evals"]]
    assert names[-1] == ("mc", 3) and ("fidelity", 2) in names
    fid = next(e for e in report["evals"] if e["task"] == "fidelity")
    assert fid["dense"]["kl"] == 0 and fid["retrofitted"]["kl"] > 0
    inputs = json.loads((out / "inputs.json").read_text())["data"]
    assert inputs["generated"]["cache_key"] and inputs["generated:test"]["generated"]["split"] == "test"
    assert inputs[str(arc)]["sha256"]
    assert (out / "state" / "fidelity-1.safetensors").is_file()


def test_cli_data_errors_are_one_line(tiny_dir):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tiny_dir), "--task", "perplexity", "--data", "hf:nobody/nothing:test"])
    assert res.exit_code == 2 and "hf:nobody/nothing:test" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["retrofit", str(tiny_dir), "--recipe", "ci/drop-tiny.yaml", "--eval", "missing.jsonl"])
    assert res.exit_code == 2 and "--eval" in res.output and "missing.jsonl" in res.output
