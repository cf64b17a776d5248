"""GPT-NeoX (Pythia): blocks in `gpt_neox.layers`, fused q/k/v in `attention.query_key_value` (interleaved per
head), `attention.dense`, a two-matrix MLP (`dense_h_to_4h`, `dense_4h_to_h`), the final `final_layer_norm`."""

from __future__ import annotations

from .base import Layout

NEOX = Layout("gpt_neox", blocks="layers", attention="attention", mlp="mlp",
              norms=("input_layernorm", "post_attention_layernorm"), final_norm="final_layer_norm",
              roles={"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                     "down": "mlp.dense_4h_to_h"},
              qkv_per_head=True, head_dim_key=False)
