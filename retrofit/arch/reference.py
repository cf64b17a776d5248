"""Cost figures measured from the modules, not a config formula: the multiply-accumulates of the linears a token
actually passes through (nn.Linear, GPT-2's Conv1D, a MoE router, and for experts stored as 3-D parameters the
`top_k` experts it is routed to), and the block weights that sparsity counts. The dense reference is pinned on
the model before any stage changes it; evaluate/cost.py measures the running model with the same counters."""

from __future__ import annotations

import torch

from adaflex.search.cost import Shape

from ..state import state_of
from .base import text_config
from .moe import expert_macs, is_experts, is_router
from .shape import head_dim, kv_heads, windows
from .structure import decoder_layers, final_norm, layout, routers


def conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_conv1d(module: torch.nn.Module) -> bool:
    """GPT-2's `Conv1D`: a linear whose weight is stored [in, out] (its forward is x @ W + b)."""
    return isinstance(module, conv1d_class())


def is_linear(module: torch.nn.Module) -> bool:
    """An nn.Linear or GPT-2's Conv1D: the linear-like modules every method treats as linears."""
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear-like module's weight as nn.Linear holds it, [out, in]: a Conv1D's is the transpose of its stored
    parameter, a view (writing it writes the module), so per-output-row rules read the same for both."""
    w = module.weight.data
    return w.T if is_conv1d(module) else w


def linear_macs(module: torch.nn.Module) -> int | None:
    """MACs per token of a dense linear-like module (None: not one). Experts are counted per routed token."""
    if is_linear(module) or is_router(module):
        return module.weight.numel()
    return None


def weight_params(block: torch.nn.Module) -> list[torch.Tensor]:
    """The projection weights of a block that sparsity counts: linears, Conv1D and every expert's slices (not
    the routers: they choose experts, no pruner touches them)."""
    out, skip = [], {id(r) for r in routers(block)}  # Qwen2-MoE's shared_expert_gate is an nn.Linear
    for m in block.modules():
        if is_linear(m) and id(m) not in skip:
            out.append(m.weight)
        elif is_experts(m):
            out += list(m.parameters(recurse=False))
    return out


def macs_per_token(model) -> int:
    """Dense MACs per token: every linear-like module once, each experts module `top_k` times one expert."""
    k = getattr(text_config(model.config), "num_experts_per_tok", None)
    total = 0
    for m in model.modules():
        macs = linear_macs(m)
        if macs is not None:
            total += macs
        elif is_experts(m):
            total += int(k) * expert_macs(m)
    return total


def dense_reference(model) -> dict:
    """The dense model's figures, kept with a retrofitted one (removed blocks still count here)."""
    blocks = decoder_layers(model)
    params = sum(w.numel() for blk in blocks for w in weight_params(blk))
    c = text_config(model.config)
    ref = {
        "num_layers": len(blocks),
        "hidden_size": c.hidden_size,
        "num_kv_heads": kv_heads(c),
        "head_dim": head_dim(c),
        "vocab_size": c.vocab_size,
        "block_linear_params": params // len(blocks) if params % len(blocks) == 0 else params / len(blocks),
        "linear_macs_per_token": macs_per_token(model),
    }
    win = windows(c)
    if any(win):
        ref["windows"] = win  # a sliding layer's dense cache holds window − 1 tokens
    return ref


def linear_dims(module: torch.nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or of GPT-2's Conv1D (a transposed linear: its weight is [in, out])."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)


def search_shape(model, bytes_per_value: float = 4.0) -> Shape:
    """The dense `Shape` the search's cost model counts with (search/cost.py), measured from the modules: its block
    MACs (so MoE, fused, two-matrix and Conv1D blocks cost what they run) and the first block's linears with the
    family's roles (what an adapter's predicted cost counts, any family); pinned reference first.
    `intermediate_size` only serves width's Llama-style cost rule (the config's key, else OPT's `ffn_dim`, GPT-2's
    `n_inner`, else 4 × hidden)."""
    ref = reference_of(model)
    c = text_config(model.config)
    head = model.get_output_embeddings().weight.numel()
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None)
    block = decoder_layers(model)[0]
    linears = tuple((n, *linear_dims(m)) for n, m in block.named_modules() if is_linear(m))
    return Shape(num_layers=ref["num_layers"], hidden_size=ref["hidden_size"],
                 intermediate_size=int(ffn or 4 * ref["hidden_size"]), num_heads=c.num_attention_heads,
                 num_kv_heads=ref["num_kv_heads"], head_dim=ref["head_dim"], vocab_size=ref["vocab_size"],
                 bytes_per_value=bytes_per_value,
                 measured_block_macs=(ref["linear_macs_per_token"] - head) // ref["num_layers"],
                 linears=linears, roles=tuple(layout(model, block).roles.items()))


def check(model) -> None:
    """Refuse, in one line, a model whose blocks, block layout or final norm adaflex cannot find (before any
    work)."""
    layout(model)
    final_norm(model)


def reference_of(model) -> dict:
    """The dense reference, pinned on the model the first time it is asked for (before any stage runs)."""
    st = state_of(model)
    if st.dense is None:
        st.dense = dense_reference(model)
    return st.dense
