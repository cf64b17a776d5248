"""Gemma 2/3: Llama's projections, with four norms per block (the attention and MLP outputs are normalised
before the residual add), so the norm before the MLP is `pre_feedforward_layernorm`, not
`post_attention_layernorm`; final-logit softcapping (heads.py) and sliding layers (shape.py) are config keys."""

from __future__ import annotations

from .base import Layout
from .llama import LLAMA

GEMMA = Layout("gemma", blocks="layers", attention="self_attn", mlp="mlp",
               norms=("input_layernorm", "pre_feedforward_layernorm"), final_norm="norm", roles=dict(LLAMA.roles))
