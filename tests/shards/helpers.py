"""Shared builders of the shards tests (tiny model from tests/conftest.py)."""

from __future__ import annotations

import torch

from adaflex.retrofit.shards.apply import init_tensors, install, make_plan
from adaflex.retrofit.shards.config import ShardsConfig


def adapt(model, seed: int = 0, random_b: bool = True, **settings):
    """Install adapters with the given settings; B pools randomised so ΔW ≠ 0 in equivalence checks."""
    cfg = ShardsConfig(**settings)
    plan = make_plan(model, cfg)
    tensors = init_tensors(plan, seed)
    if random_b:
        g = torch.Generator().manual_seed(seed + 1)
        for k, v in tensors.items():
            if k.endswith(".b") and v.is_floating_point():
                tensors[k] = (torch.randn(v.shape, generator=g) * 0.05).to(v.dtype)
    install(model, plan, tensors)
    return cfg, plan, tensors


def adaflex_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "adaflex" in n}
