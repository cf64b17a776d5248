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
        model(input_ids=probe_ids, cache=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    kv_bytes = cache.stored_bytes() if hasattr(cache, "stored_bytes") else sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )
    elem = next(model.parameters()).element_size()
    # a sliding layer of the dense model holds window − 1 tokens (transformers' DynamicSlidingWindowLayer)
    held = [arch.held_tokens(w, probe_ids.shape[1]) for w in ref.get("windows") or [None] * ref["num_layers"]]
    dense_kv = sum(held) * 2 * rows * ref["num_kv_heads"] * ref["head_dim"] * elem
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


def probe_ids(tokenizer, text: str, rows: int = 2, length: int = 128) -> torch.Tensor:
    ids = tokenizer(text[: 40 * rows * length], return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < rows * length:
        ids = ids.repeat(rows * length // max(1, ids.numel()) + 1)
    return ids[: rows * length].view(rows, length)
