"""The architecture adapter: where adaflex finds a causal LM's parts and how it computes its logits and costs.

Every stage and the evaluator ask here for the decoder blocks, a block's attention, MLP, norms and projection
roles, the final norm, the head, each layer's attention kind and the dense cost reference, instead of reading
`model.model.layers`, `self_attn` or config keys themselves. One module per family where they differ:

- llama.py: Llama, Mistral, Qwen2/3 (separate q/k/v, gated MLP) and Phi-3 (fused `qkv_proj`, `gate_up_proj`);
- gemma.py: Gemma 2/3 (Llama's projections, four norms per block);
- moe.py: Mixtral and Qwen2-MoE (router, experts as 3-D parameters, shared expert);
- neox.py: GPT-NeoX (`query_key_value`, `dense`); opt.py: OPT (`out_proj`, `fc1`/`fc2` on the block);
- gpt2.py: GPT-2 (`transformer.h`, `Conv1D` projections, a transposed linear).

structure.py recognises the family from the parts a block has; heads.py computes logits (softcapping
included); shape.py reads KV heads, head size and per-layer attention kinds (sliding windows) from
transformers' config keys; reference.py measures MACs and weights from the modules. A model whose parts match
no family is refused in one line (UsageError, exit 2) naming the model type and the missing piece. Which
method runs on which family: README.md, Supported families (tests/arch/test_matrix.py keeps it true).
"""

from __future__ import annotations

from .base import Layout, find, model_type, refuse, text_config, unknown
from .heads import hidden_states, logits, new_cache, softcap
from .moe import expert_macs, is_experts, is_router
from .reference import (
    check,
    dense_reference,
    is_conv1d,
    is_linear,
    linear_dims,
    linear_macs,
    linear_weight,
    macs_per_token,
    reference_of,
    search_shape,
    weight_params,
)
from .shape import attention_kinds, head_dim, held_tokens, kv_heads, windows
from .structure import (
    LAYOUTS,
    attention,
    blocks_name,
    decoder,
    decoder_layers,
    final_norm,
    layout,
    mlp,
    norms,
    role_names,
    roles,
    routers,
    set_decoder_layers,
)

FINAL_NORMS = tuple(dict.fromkeys(lay.final_norm for lay in LAYOUTS))

__all__ = ["FINAL_NORMS", "LAYOUTS", "Layout", "attention", "attention_kinds", "blocks_name", "check", "decoder",
           "decoder_layers", "dense_reference", "expert_macs", "final_norm", "find", "head_dim", "held_tokens",
           "hidden_states", "is_conv1d", "is_linear", "is_experts", "is_router", "kv_heads", "layout", "linear_dims",
           "linear_macs", "linear_weight", "logits", "macs_per_token", "mlp", "model_type", "new_cache", "norms",
           "reference_of", "refuse", "role_names", "roles", "routers", "search_shape", "set_decoder_layers",
           "softcap", "text_config", "unknown", "weight_params", "windows"]
