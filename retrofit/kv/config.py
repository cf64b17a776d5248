"""Settings of the `kv` stage: how much of the KV cache each layer keeps and which tokens.

The budget is a fraction of the full cache (`budget`) or a token count per layer on average (`tokens`);
it includes the attention sinks and the recent window, which are always kept."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import BLOCKS, STEPS, TOKENS, WINDOWS, Strict, capped


class KVConfig(Strict):
    budget: float | None = Field(0.25, description="fraction of the full cache kept, in (0, 1]")
    tokens: int | None = capped(None, TOKENS, ge=1,
        description="or: tokens kept per layer on average (replaces budget)")
    allocation: Literal["uniform", "pyramid", "cake", "prefixkv", "searched"] = Field(
        "uniform", description="how the global budget is spread over layers")
    policy: Literal["streaming", "snapkv", "cake", "h2o", "mix"] = Field(
        "snapkv", description="which tokens a layer keeps: most recent (StreamingLLM), window attention "
                              "(SnapKV), CAKE's mean + gamma * variance indicator, attention received from "
                              "every prompt query (h2o), or the max of snapkv and h2o (mix)")
    sinks: int = capped(4, TOKENS, ge=0, description="first tokens always kept (attention sinks)")
    window: int = capped(32, TOKENS, ge=1,
        description="last tokens always kept; also the observation window of the scores")
    recent: float = Field(0.0, ge=0, lt=1, description="extra share of each layer's budget kept as the most "
                                                      "recent tokens (beyond `window`); the rest goes by score")
    kernel: int = capped(7, TOKENS, ge=1, description="avg-pool width over key positions, so spans around a selected "
                                             "token are kept whole (odd)")
    gamma: float = Field(200.0, ge=0, description="cake indicator: weight of the attention variance")
    stat: Literal["mean", "rms"] = Field(
        "mean", description="h2o, mix: how the attention a key received from the prompt queries is summed up: "
                            "mean (H2O) or root mean square (a few strong looks outrank many weak ones)")
    heads: Literal["mean", "max"] = Field(
        "mean", description="h2o, mix: mean or max over the query heads that share a KV head")
    value_norm: bool = Field(False, description="h2o, mix: weight that score by the norm of the key's value "
                                                "(relative to the head's mean)")
    tau1: float = Field(1.0, gt=0, description="cake allocation: temperature of the entropy term")
    tau2: float = Field(1.0, gt=0, description="cake allocation: temperature of the variance term")
    beta: float = Field(20.0, ge=1, description="pyramid: the last layer gets 1/beta of the mean budget")
    min_keep: int = capped(0, TOKENS, ge=0, description="per-layer floor in tokens (never below sinks + window)")
    storage: Literal["model", "float16", "bfloat16", "int8"] = Field(
        "model", description="element type of the stored keys and values; the budget counts bytes, so "
                              "float16 keeps twice the tokens of a float32 model, int8 (one scale per "
                              "vector) nearly four times")
    decode: bool = Field(True, description="keep each layer's size fixed while generating (evict as tokens "
                                           "arrive); false: compress the prompt only and let the cache grow")
    query_agnostic: bool = Field(False, description="default protocol of passkey evaluations of this model: "
                                                    "compress the context before the question arrives")
    # offline plans (prefixkv, searched)
    calibration_samples: int | None = capped(None, WINDOWS, ge=1, description="calibration windows profiled "
                                                                     "(default min(8, data.calibration.samples))")
    trials: int = capped(24, STEPS, ge=1, description="searched: objective evaluations of the coordinate search")
    groups: int = capped(6, BLOCKS, ge=1, description="searched: layers move in this many contiguous groups (with "
                                             "layer_gains: the layers, or KV heads with head_gains, of this many "
                                             "largest gains move one by one)")
    layer_gains: bool = Field(True, description="searched: also measure what each layer gains from keeping its "
                                                "tokens (one calibration evaluation per layer) and start from "
                                                "the plans that favour the layers of largest gain")
    head_gains: int = capped(8, BLOCKS, ge=0,
        description="searched, with layer_gains: also measure the gain of each KV head "
                                                 "of the layers of this many largest gains, so that plans can "
                                                 "give single heads their full cache (0: whole layers only)")
    plan: list[float] | None = Field(None, description="explicit per-layer fractions (overrides the allocation's "
                                                        "offline plan; must have one entry per layer)")

    @model_validator(mode="after")
    def _check(self):
        if self.tokens is not None:
            if self.tokens < self.sinks + self.window:
                raise ValueError(f"tokens: {self.tokens} is smaller than sinks + window = {self.sinks + self.window}")
        else:
            if self.budget is None:
                raise ValueError("budget: give a fraction in (0, 1] or `tokens`")
            if not 0 < self.budget <= 1:
                raise ValueError(f"budget: {self.budget} is not a fraction in (0, 1]")
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel: {self.kernel} must be odd (the pooling is centred)")
        if self.plan is not None and any(not 0 < f <= 1 for f in self.plan):
            raise ValueError("plan: every per-layer fraction must lie in (0, 1]")
        return self

    @property
    def floor(self) -> int:
        return max(self.min_keep, self.sinks + self.window)


def needs_calibration(config: KVConfig) -> bool:
    """The offline allocations fit their plan on calibration windows; a given plan needs none."""
    return config.plan is None and config.allocation in ("prefixkv", "searched")
