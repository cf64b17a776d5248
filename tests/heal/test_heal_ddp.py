"""heal under torchrun: 2 CPU processes (gloo) end with the weights of one process over the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiny import ROOT

from .helpers import recipe

WORKER = Path(__file__).with_name("ddp_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(prefix: list[str], tiny_dir, rec: dict, out: Path, ranks: int) -> dict[str, torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAFLEX_PROGRESS": "0"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run([*prefix, str(WORKER), str(tiny_dir), json.dumps(rec), str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ranks"] == str(ranks)  # heal saw the process group (each rank half the batch)
    return load_file(str(out))


def test_two_gloo_processes_match_one_process(tiny_dir, tmp_path):
    rec = recipe({"drop": {"blocks": 1}}, train=["adapters", "norms", "head", "last_blocks", "replacements"],
                 last_blocks=1, tokens=1024, batch_size=4)  # 4 steps of 4 windows, 2 per rank
    one = _launch([sys.executable], tiny_dir, rec, tmp_path / "one.safetensors", 1)
    two = _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_port())], tiny_dir, rec, tmp_path / "two.safetensors", 2)
    assert one.keys() == two.keys()
    start = load_file(str(next(Path(tiny_dir).glob("*.safetensors"))))
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        moved += int(k in start and one[k].shape == start[k].shape and not torch.equal(one[k], start[k]))
    assert moved > 0  # healing changed weights, and both runs changed them alike
