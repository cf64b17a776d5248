"""How adaflex computes a model's logits itself (the evaluator, prune's distortion, routes' labels): the LM
head, then the family's post-processing (Gemma 2/3's final-logit softcapping), and the cache a model runs with."""

from __future__ import annotations

import torch

from ..state import state_of
from .base import text_config
from .structure import decoder


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
