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

    def count_linear(mod, args, _out):
        macs[0] += mod.in_features * mod.out_features * args[0].numel() // args[0].shape[-1]

    hooks = [blk.register_forward_pre_hook(count_block, with_kwargs=True) for blk in arch.decoder_layers(model)]
    hooks += [m.register_forward_hook(count_linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
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
    dense_kv = ref["num_layers"] * 2 * rows * ref["num_kv_heads"] * probe_ids.shape[1] * ref["head_dim"] * elem
    block_linears = [m for blk in arch.decoder_layers(model) for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    nonzero = sum(int(torch.count_nonzero(m.weight)) for m in block_linears)
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
