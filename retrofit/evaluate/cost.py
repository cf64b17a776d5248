"""The cost figures every report carries, measured on one probe forward of the model as it runs."""

from __future__ import annotations

import torch

from .. import arch


@torch.no_grad()
def cost_figures(model, probe_ids: torch.Tensor) -> dict:
    """Measured on one probe forward: blocks executed, KV bytes held, linear MACs, weight sparsity and
    adaflex's own trainable parameters, each relative to the dense reference."""
    ref = arch.reference_of(model)
    rows = probe_ids.shape[0]
    executed = [0]
    macs = [0]

    def count_block(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        executed[0] += h.shape[0]

    def count_linear(per_token):
        def fn(_mod, args, _out):
            macs[0] += per_token * (args[0].numel() // args[0].shape[-1])

        return fn

    def count_experts(per_pair):
        def fn(_mod, args, kwargs, _out):
            chosen = args[1] if len(args) > 1 else kwargs["top_k_index"]  # [tokens, k]: one pass per pair
            macs[0] += per_pair * chosen.numel()

        return fn

    hooks = [blk.register_forward_pre_hook(count_block, with_kwargs=True) for blk in arch.decoder_layers(model)]
    for m in model.modules():  # the linears a token passes (arch/reference.py counts the dense model the same)
        if (per_token := arch.linear_macs(m)) is not None:
            hooks.append(m.register_forward_hook(count_linear(per_token)))
        elif arch.is_experts(m):
            hooks.append(m.register_forward_hook(count_experts(arch.expert_macs(m)), with_kwargs=True))
    try:
        cache = arch.new_cache(model)
        model(input_ids=probe_ids.to(model.device), cache=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    kv_bytes, dense_kv = held_bytes(cache), dense_kv_bytes(model, rows, probe_ids.shape[1])
    nonzero = sum(int(torch.count_nonzero(w)) for blk in arch.decoder_layers(model) for w in arch.weight_params(blk))
    trainable = sum(p.numel() for n, p in model.named_parameters() if "adaflex" in n)
    return {
        "num_layers": ref["num_layers"],
        "layers_executed_mean": executed[0] / rows,
        "kv_bytes_ratio": kv_bytes / dense_kv,
        "sparsity": 1 - nonzero / (ref["block_linear_params"] * ref["num_layers"]),
        "trainable_params": trainable,
        "flops_ratio": macs[0] / (rows * probe_ids.shape[1]) / ref["linear_macs_per_token"],
    }


def held_bytes(cache) -> int:
    """Bytes of the keys and values a cache holds now (kv's budgeted cache counts its own, int8 scales included)."""
    if hasattr(cache, "stored_bytes"):
        return cache.stored_bytes()
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


def dense_kv_bytes(model, rows: int, length: int) -> int:
    """Bytes a full dense cache holds after `rows` × `length` tokens: a sliding layer of the dense model holds
    window − 1 tokens (transformers' DynamicSlidingWindowLayer)."""
    ref = arch.reference_of(model)
    elem = next(model.parameters()).element_size()
    held = [arch.held_tokens(w, length) for w in ref.get("windows") or [None] * ref["num_layers"]]
    return sum(held) * 2 * rows * ref["num_kv_heads"] * ref["head_dim"] * elem


@torch.no_grad()
def kv_at_context(model, ids: torch.Tensor) -> dict:
    """The KV bytes the model holds after prefilling `ids` [rows, length] through its own cache, per sequence
    and relative to the dense cache: an evaluation's own context, where the probe's 128 tokens can mislead (a
    per-layer floor of sinks + window is a larger share of a short prompt)."""
    cache = arch.new_cache(model)
    model(input_ids=ids.to(model.device), cache=cache, use_cache=True, logits_to_keep=1)
    rows, length = ids.shape
    held = held_bytes(cache)
    return {"kv_context": length, "kv_bytes_at_context": held // rows if held % rows == 0 else held / rows,
            "kv_bytes_ratio_at_context": held / dense_kv_bytes(model, rows, length)}


def probe_ids(tokenizer, text: str, rows: int = 2, length: int = 128) -> torch.Tensor:
    ids = tokenizer(text[: 40 * rows * length], return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < rows * length:
        ids = ids.repeat(rows * length // max(1, ids.numel()) + 1)
    return ids[: rows * length].view(rows, length)
