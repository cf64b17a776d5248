"""The GPU end-to-end benchmark (tests/bench/gpu_e2e.py) runs on CPU with a tiny model: one lent GPU call can't be
spent debugging it. Every system is built and measured, figures land in the JSON as they come, a failing cell is
recorded and the rest goes on, a deadline skips what is left; the bundle's tensors travel in bf16."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import gpu_e2e  # noqa: E402
import gpu_prepare  # noqa: E402

TINY = ["--device", "cpu", "--dtype", "float32", "--models", "tiny", "--contexts", "48", "96", "--batches", "1",
        "3", "--decode-context", "40", "--decode-steps", "3", "--repeats", "1", "--ppl-windows", "2",
        "--ppl-context", "32", "--ppl-continuation", "16", "--heal-steps", "2", "--lora-tokens", "1", "4"]


def run(tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    out = tmp_path / "out"
    data = gpu_e2e.main([*TINY, "--bundle", str(tmp_path / "no-bundle"), "--out", str(out), *extra])
    assert json.loads((out / "e2e.json").read_text())["rows"] == json.loads(json.dumps(data["rows"], default=str))
    return data, out


def test_every_system_measured_against_dense_and_its_ideal(tmp_path):
    data, out = run(tmp_path)
    rows = {r["system"]: r for r in data["rows"]}
    assert list(rows) == ["dense", "kv", "drop", "width", "quickstart"]  # routes: only from a bundle's run
    for name, r in rows.items():
        assert r["built"] is True, (name, r)
        assert math.isfinite(r["ppl_fp32"]) and r["ppl_fp32"] > 1
        assert abs(r["ppl_fp32_vs_cpu"]) < 1e-6 if name in ("dense", "width") else "cpu_ppl" in r
        for c in (48, 96):
            assert r[f"prefill_{c}_tok_s"] > 0
        for b in (1, 3):
            assert r[f"decode_b{b}"]["tok_s"] > 0 and r[f"decode_b{b}_read_bytes"] > 0
    dense = rows["dense"]
    # what the cost figures predict: fewer blocks / narrower blocks read fewer weight bytes and run fewer MACs
    assert rows["drop"]["ideal_prefill_x"] == pytest.approx(4 / 3, rel=0.05)
    assert rows["width"]["ideal_prefill_x"] > 1.2 and rows["quickstart"]["ideal_prefill_x"] > 1.1
    assert rows["kv"]["ideal_prefill_x"] == pytest.approx(1.0)
    assert rows["kv"]["decode_b3"]["kv_held_bytes"] < dense["decode_b3"]["kv_held_bytes"]
    assert rows["kv"]["ideal_decode_b3_x"] > 1
    for r in data["lora"]:
        u = r["us"]
        assert u["shard_lora_eager_us"] > 0 and u["peft_lora_eager_us"] > 0 and u["shard_over_peft_eager"] > 0
    (heal,) = data["heal"]
    assert heal["heal"]["train_tokens_per_s"] > 0 and heal["heal"]["steps"] == 2
    md = (out / "e2e.md").read_text()
    assert "| tiny | quickstart |" in md and "shard-LoRA" in md and "training tokens/s" in md


def test_a_failing_cell_is_recorded_and_the_rest_goes_on(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (planted)")

    monkeypatch.setattr(gpu_e2e, "prefill_tok_s", boom)
    data, _ = run(tmp_path, "--systems", "dense", "drop")
    for r in data["rows"]:
        assert r["prefill_96_tok_s"].startswith("error: RuntimeError: CUDA out of memory")
        assert r["decode_b1"]["tok_s"] > 0  # measured after the failing cells
    assert "prefill_96_x" not in data["rows"][1]


def test_deadline_skips_what_is_left_and_still_writes(tmp_path):
    data, out = run(tmp_path, "--deadline", "0", "--systems", "dense")
    (row,) = data["rows"]
    assert row["built"] == "skipped: deadline"
    assert all(r["us"] == "skipped: deadline" for r in data["lora"])
    assert "skipped" in (out / "e2e.md").read_text()


def test_bundle_tensors_travel_in_bf16_with_their_metadata(tmp_path):
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    w, idx = torch.randn(4, 3), torch.tensor([0, 2, 5])
    save_file({"w": w, "idx": idx}, str(src), metadata={"stages": "x"})
    gpu_prepare.bf16_tensors(src, dst)
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"stages": "x"}
        assert f.get_tensor("w").dtype == torch.bfloat16 and torch.equal(f.get_tensor("w"), w.to(torch.bfloat16))
        assert torch.equal(f.get_tensor("idx"), idx)


@pytest.mark.parametrize("argv", [["--run", "nope=runs/x"], ["--run", "kv=/nonexistent"], ["--data", "/nonexistent"]])
def test_prepare_refuses_bad_input_before_writing(tmp_path, argv, capsys):
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as e:
        gpu_prepare.main([*argv, "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert argv[1] in err or argv[1].split("=")[1] in err
    assert not out.exists()
