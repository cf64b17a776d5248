"""GPT-2: blocks in `transformer.h`, fused q/k/v in `attn.c_attn`, a two-matrix MLP, all `Conv1D` (a linear whose
weight is stored [in, out]), LayerNorms `ln_1`, `ln_2` and the final `ln_f`; absolute position embeddings."""

from __future__ import annotations

from .base import Layout

GPT2 = Layout("gpt2", blocks="h", attention="attn", mlp="mlp", norms=("ln_1", "ln_2"), final_norm="ln_f",
              roles={"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
              conv1d=True, ffn_key="n_inner", head_dim_key=False)
