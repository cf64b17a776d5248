"""Settings of the `shards` stage: adapter shape (MoS or LoRA) and the healing loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..schema import BATCH, STEPS, TOKENS, WIDTH, WINDOWS, Strict, capped

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the projection roles of the other families the architecture adapter maps (retrofit/arch): Phi-3's fused
# qkv_proj / gate_up_proj, GPT-NeoX, OPT, and GPT-2's Conv1D (`c_proj` is in both attn and mlp: named by its path)
FAMILY_TARGETS = ("qkv_proj", "gate_up_proj", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
                  "out_proj", "fc1", "fc2", "c_attn", "c_fc", "attn.c_proj", "mlp.c_proj")
# the 3-D parameters of a MoE experts module (transformers 5's Mixtral / Qwen2-MoE `mlp.experts`), named as peft's
# `target_parameters` name them; `experts` is short for both. LoRA only (experts.py), never a default target
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
Target = Literal[TARGETS + FAMILY_TARGETS + EXPERT_TARGETS]


class AdapterConfig(Strict):
    """The adapter's shape (MoS or LoRA): shared by `shards` and `heal` (retrofit/heal)."""

    method: Literal["mos", "lora"] = Field("mos", description="mos: shared shard pools; lora: plain LoRA")
    rank: int = capped(8, WIDTH, ge=1, description="active rank r of every layer's adapter")
    equivalent_rank: int = capped(1, WIDTH, ge=1, description="mos: budget e; parameters = those of a rank-e LoRA")
    shards_per_vector: int = capped(4, WIDTH, ge=1, description="mos: l shards per rank vector (divides every dim)")
    private_rank: int = capped(0, WIDTH, ge=0, description="mos: p rank vectors per layer drawn from its private pool")
    subset_selection: bool = Field(True, description="mos: a layer's shards drawn without replacement")
    pair_dissociation: bool = Field(True, description="mos: A and B indices drawn independently")
    vector_sharding: bool = Field(True, description="mos: each of a vector's l shards drawn on its own")
    targets: list[Target] = Field(default_factory=lambda: list(TARGETS), min_length=1,
                                  description="projections adapted (short names q, k, ..., down accepted); "
                                  "left unset on a block without Llama's names: its family's linear roles; "
                                  "`experts`: a MoE's 3-D expert parameters (lora only, never by default)")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: ΔW = B·A·alpha/r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input while training")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the adapter parameters")

    @field_validator("targets", mode="before")
    @classmethod
    def _long_names(cls, v):
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            v = [f"{t}_proj" if isinstance(t, str) and f"{t}_proj" in TARGETS + FAMILY_TARGETS else t
                 for t in v]
            v = [x for t in v for x in (EXPERT_TARGETS if t == "experts" else (t,))]
            if len(set(v)) != len(v):
                raise ValueError("targets: duplicate projection")
        return v

    @model_validator(mode="after")
    def _shape(self):
        if self.method == "mos":
            why = mos_feasibility(self.rank, self.equivalent_rank, self.shards_per_vector, self.private_rank)
            if why:
                raise ValueError(why)
            experts = [t for t in self.targets if t in EXPERT_TARGETS]
            if experts:
                raise ValueError(f"targets: {experts[0]} is a 3-D experts parameter: MoS pools are shared by linears "
                                 "of one shape, not per-expert slices; use method: lora")
        return self


def mos_feasibility(r: int, e: int, n_sh: int, p: int, num_layers: int | None = None,
                    subset: bool = True) -> str | None:
    """Why MoS pools of these sizes cannot be drawn, or None: the one statement of the rule (README, "Checks").
    One side's pool holds e·L·l shards, the first (e−p)·L·l public (indices.py). `num_layers` None: only the
    checks that need no model (recipe validation); with it, also the draw without replacement."""
    if e > r:
        return f"equivalent_rank {e} exceeds rank {r} (MoS saves r/e; e > r costs more than LoRA)"
    if p > r or p > e:
        return f"private_rank {p} must not exceed rank {r} nor equivalent_rank {e}"
    if p == e and r > p:
        return f"private_rank {p} = equivalent_rank leaves no public pool for the other {r - p} rank vectors"
    if num_layers is not None and subset:
        public, need = (e - p) * num_layers * n_sh, (r - p) * n_sh
        if need > public:
            return (f"(rank − private_rank)·shards_per_vector = {need} public shards per layer exceed the public "
                    f"pool of {public} shards ((equivalent_rank − private_rank)·layers·shards_per_vector) drawn "
                    "without replacement")
    return None


class ShardsConfig(AdapterConfig):
    # --- the healing loop ---
    loss: Literal["kl", "lm"] = Field("kl", description="kl: distil the dense teacher's logits; lm: next token")
    teacher: Literal["dense", "input"] = Field(
        "dense", description="dense: the original model reloaded; input: this stage's input model, adapters off")
    temperature: float = Field(1.0, gt=0)
    steps: int = capped(100, STEPS, ge=0, description="optimizer steps (0: adapters stay at their zero ΔW)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = capped(0, STEPS, ge=0, description="linear warm-up steps, then cosine decay to 10%")
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = capped(4, BATCH, ge=1)
    seq_len: int | None = capped(None, TOKENS, ge=8, description="training window (default: the calibration seq_len)")
    holdout: int = capped(0, WINDOWS, ge=0, description="calibration windows kept out of training to measure KL/loss")
    gradient_checkpointing: bool = False
    checkpoint_every: int = capped(10, STEPS, ge=1, description="steps between resumable checkpoints in the run dir")

