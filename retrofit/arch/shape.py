"""Shape facts read from transformers' own config keys: KV heads (defaulting to heads), head size and each layer's
attention kind (`config.layer_types`, `config.sliding_window`). The dense `Shape` the search's cost model counts
with is measured from the modules (reference.py `search_shape`), not read from config keys."""

from __future__ import annotations

from .base import text_config

SLIDING = "sliding_attention"


def kv_heads(config) -> int:
    """Key/value heads (grouped-query attention); multi-head models have as many as query heads."""
    c = text_config(config)
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def head_dim(config) -> int:
    c = text_config(config)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def attention_kinds(config) -> list[tuple[str, int | None]]:
    """Per layer: ("full_attention", None) or ("sliding_attention", window), as transformers' DynamicCache builds
    its layers: `config.layer_types` where the config has them, else every layer sliding when the config sets a
    `sliding_window` (Mistral) and does not switch it off (`use_sliding_window: false`, Qwen2)."""
    c = text_config(config)
    n = c.num_hidden_layers
    window = getattr(c, "sliding_window", None) or None
    if getattr(c, "use_sliding_window", True) is False:
        window = None
    types = list(getattr(c, "layer_types", None) or [SLIDING if window else "full_attention"] * n)
    return [(t, window if t == SLIDING and window else None) for t in types[:n]]


def windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention)."""
    return [w for _, w in attention_kinds(config)]


def held_tokens(window: int | None, length: int) -> int:
    """Tokens a layer's full cache holds after `length`: a sliding layer at most window − 1, what later queries can
    still see (transformers' DynamicSlidingWindowLayer); the dense KV bytes and kv's budgets count it so."""
    return min(length, window - 1) if window else length

