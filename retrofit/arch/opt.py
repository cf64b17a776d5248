"""OPT: blocks in `model.decoder.layers`, separate q/k/v with `out_proj`, the two-matrix MLP (`fc1`, `fc2`) on
the block itself (no MLP module), LayerNorms `self_attn_layer_norm`, `final_layer_norm` and the decoder's
`final_layer_norm`; learned absolute positions."""

from __future__ import annotations

from .base import Layout

OPT = Layout("opt", blocks="layers", attention="self_attn", mlp=None,
             norms=("self_attn_layer_norm", "final_layer_norm"), final_norm="final_layer_norm",
             roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
             ffn_key="ffn_dim", head_dim_key=False)
