"""Settings of the `heal` stage: what it trains, its loss and its token budget (retrofit/heal/README.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import BATCH, BLOCKS, STEPS, TOKENS, WIDTH, Strict, capped
from ..shards.config import AdapterConfig

Trainable = Literal["adapters", "norms", "head", "last_blocks", "replacements"]


class HealConfig(Strict):
    train: list[Trainable] = Field(default_factory=lambda: ["adapters"], min_length=1,
                                   description="what heal trains; everything else stays frozen")
    last_blocks: int = capped(2, BLOCKS, ge=1,
        description="last_blocks: how many of the last kept blocks train in full")
    adapter: AdapterConfig = Field(default_factory=lambda: AdapterConfig(method="lora", rank=16, dropout=0.0),
                                   description="adapters: the shape, with the `shards` stage's settings")
    replacement_rank: int = capped(16, WIDTH, ge=1, description="replacements: rank of the identity-initialised map")
    tokens: int = capped(74_000, STEPS, ge=0,
        description="training token budget (steps = tokens / (batch_size·seq_len))")
    loss: Literal["kl", "lm"] = Field("kl", description="kl: top-k KL to the dense model; lm: next token")
    top_k: int = capped(64, WIDTH, ge=1, description="teacher logits kept per token (the rest is one tail bin)")
    temperature: float = Field(1.0, gt=0)
    lr: float = Field(1e-3, gt=0, description="learning rate of adapters and replacements")
    weights_lr: float = Field(5e-5, gt=0, description="learning rate of norms, head and last blocks")
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = capped(0, STEPS, ge=0, description="linear warm-up steps, then cosine decay to 10%")
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = capped(4, BATCH, ge=1, description="global batch (split over ranks under torchrun)")
    seq_len: int | None = capped(None, TOKENS, ge=8, description="training window (default: the calibration seq_len)")
    checkpoint_every: int = capped(10, STEPS, ge=1, description="steps between resumable checkpoints")

    @field_validator("train")
    @classmethod
    def _once(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("train: an item is listed twice")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.tokens == 0:
            raise ValueError(f"tokens: 0 with train {self.train}: give a token budget (e.g. tokens: 74000)")
        return self


def check_last(index: int, methods: list[str], where: str) -> None:
    """Heal heals what the earlier stages left; a stage after it would change the model it was fitted to. (Here,
    not in the Method, so that apply.py checks it too without importing the package's __init__.)"""
    if index != len(methods) - 1:
        from ..errors import UsageError

        raise UsageError(f"{where}: heal must be the last stage (followed by {', '.join(methods[index + 1:])})")
