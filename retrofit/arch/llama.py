"""Llama-style decoders: Llama, Mistral, Qwen2/3 (gated MLP, separate q/k/v), and Phi-3, whose
attention fuses q/k/v into `qkv_proj` and whose MLP fuses gate and up into `gate_up_proj`."""

from __future__ import annotations

from .base import Layout

ATTENTION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
NORMS = ("input_layernorm", "post_attention_layernorm")

LLAMA = Layout("llama-style", blocks="layers", attention="self_attn", mlp="mlp", norms=NORMS, final_norm="norm",
               roles={**ATTENTION, "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"})

PHI3 = Layout("phi3-style (fused qkv_proj, gate_up_proj)", blocks="layers", attention="self_attn", mlp="mlp",
              norms=NORMS, final_norm="norm",
              roles={"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                     "down": "mlp.down_proj"})
