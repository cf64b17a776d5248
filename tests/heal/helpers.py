"""Shared builders of the heal tests: composed recipes on the tiny model of tests/conftest.py."""

from __future__ import annotations

import copy

import torch
from safetensors.torch import load_file

import adaflex.retrofit as af
from tiny import GENERATED

CAL = {"path": "generated", "samples": 8, "seq_len": 64}
HEAL = {"train": ["adapters", "head", "replacements"], "adapter": {"method": "lora", "rank": 4, "dropout": 0.0},
        "tokens": 1536, "batch_size": 4, "top_k": 16, "lr": 0.005, "weights_lr": 0.001, "checkpoint_every": 2}


def recipe(*stages, **heal) -> dict:
    h = copy.deepcopy(HEAL)
    h.update(heal)
    return {"seed": 0, "data": {"calibration": dict(CAL), "generated": GENERATED}, "stages": [*stages, {"heal": h}]}


def run(tiny_dir, rec: dict, out=None):
    """Load the tiny model, retrofit it with `rec`; returns (model, tokenizer, report)."""
    model, tok = af.load(str(tiny_dir))
    report = af.run(rec, model, tok, model_name=str(tiny_dir), out=out, log=lambda m: None)
    return model, tok, report


def heal_tensors(run_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run_dir / "adaflex.safetensors")).items() if ".heal." in k}


@torch.no_grad()
def dense_kl(model, dense, ids: torch.Tensor) -> float:
    """Full-vocabulary KL(dense ‖ model), mean over tokens."""
    lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    lq = torch.log_softmax(dense(input_ids=ids, use_cache=False).logits.float(), -1)
    return float((lq.exp() * (lq - lp)).sum(-1).mean())
