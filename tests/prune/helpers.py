"""Shared helpers of the prune tests: a stage context on the tiny model and a fit call."""

from __future__ import annotations

from adaflex.retrofit.prune.apply import fit
from adaflex.retrofit.prune.config import PruneConfig
from adaflex.retrofit.recipe import validate
from adaflex.retrofit.stage import StageContext
from tiny import GENERATED

DATA = "generated"


def context(model, tok, state_dir=None, samples: int = 4, seq_len: int = 32, seed: int = 0) -> StageContext:
    recipe = validate({"seed": seed, "data": {"calibration": {"path": DATA, "samples": samples, "seq_len": seq_len},
                                                      "generated": GENERATED}})
    return StageContext(model, tok, recipe, 0, state_dir)


def run_fit(model, tok, state_dir=None, **settings):
    cfg = PruneConfig(**settings)
    return fit(context(model, tok, state_dir), cfg), cfg
