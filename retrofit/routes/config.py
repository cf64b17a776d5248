"""Settings of the `routes` stage (fixed keys: `max_executed`, `simulations`, `examples`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from ..schema import BATCH, BLOCKS, SEED, STEPS, TOKENS, WIDTH, WINDOWS, BlockIndex, Strict, capped
from ..sources import DataPath


class RoutesConfig(Strict):
    # budget and search (fixed keys)
    max_executed: float | None = Field(None, ge=1, le=BLOCKS.limit,
        description="blocks executed per example, on average (the dial "
                                      "is calibrated to it; also caps each label when label_cap is true)")
    label_cap: bool = Field(False, description="labels must execute <= max_executed blocks (needs deep searches: "
                                               "a path L-k deep is >= k/2 expansions below the root)")
    simulations: int = capped(50, STEPS, ge=1, description="MCTS simulations per example")
    examples: int = capped(256, WINDOWS, ge=1, description="training examples to label")
    # data
    train: list[DataPath] = Field(default_factory=list,
                                  description="MCTS data: ARC/PIQA/HellaSwag JSONL, text, hf:ID or generated "
                                              "(default: data.calibration)")
    text_len: int = capped(64, TOKENS, ge=8,
        description="tokens per text example (first half prompt, second half scored)")
    max_tokens: int = capped(256, TOKENS, ge=8, description="longest context kept for a multiple-choice example")
    # MCTS (search/mcts.py)
    c: float = Field(1.8, ge=0, description="UCB exploration constant")
    lam: float = Field(3.0, ge=0, description="length penalty")
    epsilon: float = Field(0.1, ge=0, le=1, description="random-child probability")
    min_saving: int = capped(2, BLOCKS, ge=1, description="early stop once a correct path saves this many blocks")
    early_stop: bool = True
    expand: Literal["influence", "random"] = Field(
        "influence", description="which untried action MCTS expands: the one removing the least block "
                                 "influence (ShortGPT, measured on the calibration data) or a random one (Dr.LLM)")
    widening: float | None = Field(1.0, gt=0, description="progressive widening: a node with n visits is "
                                   "expanded to ceil(widening * sqrt(n)) children before the search descends "
                                   "(null: every action first, as Dr.LLM)")
    text_tolerance: float = Field(0.05, ge=0, description="text: a path is correct if its loss <= dense * (1 + tol)")
    mc_reward: Literal["margin", "correct"] = Field(
        "margin", description="multiple choice: `correct` = 1 when the correct choice scores highest (Dr.LLM); "
                              "`margin` also asks a path to keep the correct choice's log-likelihood lead over "
                              "the best other choice within margin_tolerance of dense's (where dense is right)")
    margin_tolerance: float = Field(0.1, ge=0, description="mc_reward margin: a path is correct if its lead >= "
                                                           "dense's / (1 + tol)")
    min_fix_share: float = Field(0.3, ge=0, le=1, description="share of kept examples where routing fixes dense")
    prefix_cache: int = capped(512, TOKENS, ge=1, description="hidden states kept for prefix reuse per example")
    shard: str | None = Field(None, description="'i/n': label only examples with index % n == i")
    labels_dir: str | None = Field(None, description="folder for labels shared by shard workers (default: stage state)")
    # routers
    bottleneck: int = capped(32, WIDTH, ge=1)
    router_seed: int | None = capped(None, SEED, ge=0,
        description="seed of the routers' initialisation and batch order "
                                    "(default: the stage's seed); labels do not depend on it")
    windows: int = capped(8, TOKENS, ge=1, description="mean-pooling windows over the prompt (min(windows, T))")
    epochs: int = capped(20, STEPS, ge=1)
    min_steps: int = capped(300, STEPS, ge=0,
        description="at least this many optimizer steps (more epochs on few examples)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_size: int = capped(16, BATCH, ge=1)
    warmup: int = capped(500, STEPS, ge=0, description="warm-up steps (at most a tenth of all steps)")
    gamma: float = Field(2.0, ge=0, description="focal loss exponent")
    beta: float = Field(0.999, ge=0, lt=1, description="effective-number class weights")
    dial: float | Literal["auto"] = Field("auto", description="p in [-1, 1]: <0 towards skip, >0 towards repeat; "
                                                              "auto: the largest p in [-1, 0] meeting max_executed")
    calibrate_examples: int = capped(32, WINDOWS, ge=1,
        description="unlabelled prompts of the training files (those after "
                                    "the labelled ones) the auto dial is calibrated on")
    guard: float | None = Field(None, gt=0, lt=1, description="out-of-domain guard: a prompt whose pooled state "
                                "entering the first routed block lies farther from the training prompts' "
                                "principal subspace than this quantile of held-out training prompts runs every "
                                "block (routers learnt one task's paths; null: off). The dial then meets the "
                                "budget on the training prompts")
    guard_rank: int = capped(8, WIDTH, ge=1, description="principal directions of the guard's subspace")
    # static use and failure policy
    path: list[BlockIndex] | None = Field(None, max_length=BLOCKS.limit,
        description="a fixed path for every input (no search, no routers)")
    fallback_dense: bool = Field(False, description="run dense when the router weights are missing")

    @field_validator("shard")
    @classmethod
    def _shard(cls, v):
        if v is None:
            return v
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", v)
        if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
            raise ValueError(f"shard must be 'i/n' with 0 <= i < n, got {v!r}")
        return f"{int(m.group(1))}/{int(m.group(2))}"

    @field_validator("dial")
    @classmethod
    def _dial(cls, v):
        if v != "auto" and not -1.0 <= v <= 1.0:
            raise ValueError(f"dial must lie in [-1, 1] or be 'auto', got {v}")
        return v

    def shard_of(self) -> tuple[int, int]:
        if self.shard is None:
            return 0, 1
        i, n = self.shard.split("/")
        return int(i), int(n)
