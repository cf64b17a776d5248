"""Settings of the `width` stage: structured pruning of FFN channels and attention heads (GQA-aware), with
the per-block widths chosen uniformly, by a knapsack DP over measured distortion curves, or by an
EvoPress-style (1+λ) evolutionary search (retrofit/width/README.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import BATCH, STEPS, WIDTH, WINDOWS, Strict, capped


class WidthConfig(Strict):
    fraction: float | None = Field(
        None, gt=0, lt=1, description="share of the decoder blocks' linear MACs to remove")
    # an explicit uniform architecture (Minitron's target shape) instead of a fraction
    intermediate_size: int | None = capped(None, WIDTH, ge=1, description="uniform: FFN channels kept in every block")
    num_heads: int | None = capped(None, WIDTH, ge=1, description="uniform: query heads kept in every block")
    num_kv_heads: int | None = capped(None, WIDTH, ge=1,
        description="uniform: KV heads (GQA groups) kept in every block")
    allocation: Literal["uniform", "dp", "evo"] = Field(
        "dp", description="per-block widths: the same everywhere, DP over measured curves, or (1+λ) evolution")
    importance: Literal["activation", "wanda"] = Field(
        "activation", description="Minitron's activation norms, or |W|·‖x‖ of each channel / head")
    prune: Literal["both", "mlp", "attention"] = Field("both", description="which sublayers lose width")
    kv_groups: bool = Field(False, description="whole KV groups may go (else every block keeps all KV heads)")
    channel_multiple: int = capped(32, WIDTH, ge=1, description="kept FFN channels are a multiple of this")
    levels: int = Field(10, ge=2, le=64, description="dp/evo: FFN widths per block (removed share evenly "
                                                     "spaced over [0, max_removed])")
    max_removed: float = Field(0.9, gt=0, lt=1, description="dp/evo: most of a sublayer's MACs removed")
    distortion: Literal["kl", "mse"] = Field("kl", description="dp/evo: KL to the dense model, or logit MSE")
    curve_samples: int = capped(2, WINDOWS, ge=1,
        description="dp/evo: calibration windows the distortions are measured on")
    evaluations: int | None = capped(
        None, STEPS, ge=1, description="evo: distortion evaluations (default: as many as the DP's curves take)")
    offspring: int = Field(8, ge=1, le=256, description="evo: λ, children per generation")
    refit: bool = Field(False, description="least-squares refit of down_proj / o_proj on the kept channels")
    refit_damp: float = Field(0.01, gt=0, description="refit: ridge term, relative to the mean Gram diagonal")
    batch_size: int = capped(8, BATCH, ge=1, description="calibration windows per forward")

    @model_validator(mode="after")
    def _one_of(self):
        shape = [self.intermediate_size, self.num_heads, self.num_kv_heads]
        explicit = any(v is not None for v in shape)
        if explicit and self.fraction is not None:
            raise ValueError("give either 'fraction' or explicit widths (intermediate_size, num_heads, "
                             "num_kv_heads), not both")
        if not explicit and self.fraction is None:
            raise ValueError("give 'fraction' (or explicit widths for allocation 'uniform')")
        if explicit and self.allocation != "uniform":
            raise ValueError(f"allocation '{self.allocation}': explicit widths need allocation 'uniform'")
        return self
