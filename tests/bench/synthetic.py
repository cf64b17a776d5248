"""Random-weight models for the speed benchmarks (width_speed.py, gpu_e2e.py): a Llama of a given block shape and
the two ways of shrinking it that need no trained weights (a bench module, not collected by pytest)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from adaflex.retrofit.arch import decoder_layers, reference_of
from adaflex.retrofit.drop.apply import remove_blocks
from adaflex.retrofit.width.apply import apply as width_apply
from adaflex.retrofit.width.apply import narrow_plan
from adaflex.retrofit.width.importance import collect, scores
from adaflex.retrofit.width.parts import dims_of
from adaflex.retrofit.width.plan import WidthPlan
from adaflex.retrofit.width.shapes import uniform_width


def build(hidden, inter, heads, kv, layers, vocab: int = 49152, device="cpu", max_positions: int | None = None):
    """A Llama of this block shape with seeded random weights, initialised on `device` (a 7B-like block shape
    loads in seconds on a GPU); width_speed.py and gpu_e2e.py build theirs here."""
    extra = {"max_position_embeddings": max_positions} if max_positions else {}
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=True, **extra)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    reference_of(model)
    return model


def drop_blocks(model, k: int):
    """Remove the last k blocks (which ones does not matter for speed on random weights)."""
    remove_blocks(model, list(range(len(decoder_layers(model)) - k)))
    return model


def narrow_uniform(model, fraction: float, ids: torch.Tensor, multiple: int = 32):
    """FFN-only uniform width removing `fraction` of every block's MACs, channels ranked by activation on `ids`."""
    dims, parts = dims_of(model, "width")
    st = collect(model, ids, dims, parts)
    mlp_s, head_s = scores(model, st, "activation", dims, parts)
    w = uniform_width(dims, fraction, "mlp", False, multiple)
    plan, tensors = narrow_plan(model, dims, [w] * len(decoder_layers(model)), mlp_s, head_s)
    width_apply(model, WidthPlan.model_validate(plan), tensors)
    return model
