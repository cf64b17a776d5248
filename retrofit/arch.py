"""The architecture adapter: where adaflex finds a causal LM's parts and how it computes its logits.

Every stage and the evaluator ask here for the decoder blocks, a block's attention, MLP and norms, the final
norm, the head and the config's shape keys, instead of reading `model.model.layers` or `config.X` themselves.
What it knows today is the Llama-style decoder that transformers' Llama, Mistral, Qwen2/3 and Gemma 2/3 share
(`get_decoder().layers`, blocks with `self_attn`, `mlp`, `input_layernorm`, `post_attention_layernorm`), with
Gemma 2's final-logit softcapping; for anything else it refuses in one line naming the model type and the missing
piece, never an AttributeError. Other families (fused qkv, GPT-2's `transformer.h`, MoE experts) and per-layer
attention kinds (sliding windows) are issue 26's: they extend this module.
"""

from __future__ import annotations

import torch

from adaflex.search.cost import Shape

from .errors import UsageError
from .state import state_of

FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")  # the decoder's attribute, by family
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def model_type(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", None) or type(config).__name__)


def unknown(model_or_config, piece: str) -> UsageError:
    """The one-line refusal for a model whose `piece` adaflex cannot find."""
    return UsageError(f"model type '{model_type(model_or_config)}': adaflex does not know {piece} "
                      "(it knows Llama-style decoders: blocks in get_decoder().layers with self_attn, mlp and norms)")


# ---- structure ----


def decoder(model) -> torch.nn.Module:
    get = getattr(model, "get_decoder", None)
    dec = get() if get is not None else None
    if not isinstance(dec, torch.nn.Module):
        raise unknown(model, "its decoder (no get_decoder())")
    return dec


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks, in order (a stage that removes blocks replaces this list)."""
    dec = decoder(model)
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise unknown(model, f"its decoder blocks (no `layers` list on {type(dec).__name__})")
    return layers


def _part(model, block, name: str, role: str) -> torch.nn.Module:
    mod = getattr(block, name, None)
    if not isinstance(mod, torch.nn.Module):
        raise unknown(model, f"a block's {role} (no `{name}` on {type(block).__name__})")
    return mod


def attention(model, block) -> torch.nn.Module:
    return _part(model, block, "self_attn", "attention")


def mlp(model, block) -> torch.nn.Module:
    return _part(model, block, "mlp", "MLP")


def norms(model, block) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(norm before attention, norm before the MLP) of a block."""
    return (_part(model, block, "input_layernorm", "input norm"),
            _part(model, block, "post_attention_layernorm", "post-attention norm"))


def final_norm(model) -> torch.nn.Module:
    dec = decoder(model)
    for name in FINAL_NORMS:
        mod = getattr(dec, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise unknown(model, f"its final norm (none of {', '.join(FINAL_NORMS)} on {type(dec).__name__})")


# ---- logits ----


def text_config(config):
    """The language model's config (a multimodal config nests it)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def softcap(config) -> float | None:
    """Gemma 2's final-logit softcapping (`cap · tanh(logits / cap)`), None where the model has none."""
    cap = getattr(text_config(config), "final_logit_softcapping", None)
    return float(cap) if cap else None


def hidden_states(model, input_ids, attention_mask=None, **kw) -> torch.Tensor:
    """Final normalised hidden states of the decoder (no LM head)."""
    return decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)[0]


def logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model's logits (float32) from final normalised hidden states, post-processed as transformers does."""
    out = model.get_output_embeddings()(h).float()
    cap = softcap(model.config)
    return out if cap is None else torch.tanh(out / cap) * cap


def new_cache(model):
    """The cache a model runs with: a retrofit (KV budgets) may install its own factory."""
    factory = state_of(model).make_cache
    if factory is not None:
        return factory()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


# ---- shape and the dense reference ----


def kv_heads(config) -> int:
    """Key/value heads (grouped-query attention); multi-head models have as many as query heads."""
    c = text_config(config)
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def head_dim(config) -> int:
    c = text_config(config)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def shape(config, bytes_per_value: float = 4.0) -> Shape:
    """The dense dimensions the cost model counts (search/cost.py); refuses a config without a key it needs."""
    c = text_config(config)
    for key in SHAPE_KEYS:
        if not isinstance(getattr(c, key, None), int):
            raise unknown(config, f"its {key.replace('_', ' ')} (the config has no '{key}')")
    return Shape.from_config(c, bytes_per_value)


def dense_reference(config) -> dict:
    """Shapes of the dense model, kept with a retrofitted one (removed blocks still count here). The block's
    MACs are the cost model's (search/cost.py `Shape.block_macs`: q, k, v, o, gate, up, down)."""
    s = shape(config)
    return {
        "num_layers": s.num_layers,
        "hidden_size": s.hidden_size,
        "num_kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab_size,
        "block_linear_params": s.block_macs,
        "linear_macs_per_token": s.block_macs * s.num_layers + s.head_macs,
    }


def check(model) -> None:
    """Refuse, in one line, a model whose blocks, final norm or shape keys adaflex cannot find (before any work)."""
    decoder_layers(model)
    final_norm(model)
    shape(model.config)


def reference_of(model) -> dict:
    """The dense reference, pinned on the model the first time it is asked for (before any stage runs)."""
    st = state_of(model)
    if st.dense is None:
        st.dense = dense_reference(model.config)
    return st.dense
