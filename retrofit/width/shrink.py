"""Make a block physically narrower (smaller nn.Linear modules), and the inverse for exports whose widths
differ per block: the state dict padded back to the dense shapes with zeros.

transformers' LlamaAttention takes its head count from the q/k/v outputs (`view(..., -1, head_dim)`) and
only `num_key_value_groups` (query heads per KV head, for repeat_kv) from the module, so a narrower
attention needs smaller q/k/v/o and that one attribute.
"""

from __future__ import annotations

import torch
from torch import nn

from .importance import head_columns, sublayers
from .shapes import Dims


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            weight: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    if weight is not None:
        w = weight.to(w.dtype)
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.detach()[rows] if rows is not None else old.bias.detach())
    new.train(old.training)
    return new


@torch.no_grad()
def shrink_block(block, dims: Dims, channels: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor,
                 down: torch.Tensor | None = None, o: torch.Tensor | None = None) -> None:
    """Keep the given FFN channels, query heads and KV groups (ascending indices); `down` / `o` replace
    the kept columns of down_proj / o_proj (the least-squares refit)."""
    attn, mlp = sublayers(block)
    if channels.numel() < dims.intermediate or down is not None:
        mlp.gate_proj = _linear(mlp.gate_proj, rows=channels)
        mlp.up_proj = _linear(mlp.up_proj, rows=channels)
        mlp.down_proj = _linear(mlp.down_proj, cols=channels, weight=down)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = int(channels.numel())
    if heads.numel() < dims.heads or o is not None:
        qcols = head_columns(heads, dims.head_dim)
        kvrows = head_columns(groups, dims.head_dim)
        attn.q_proj = _linear(attn.q_proj, rows=qcols)
        attn.k_proj = _linear(attn.k_proj, rows=kvrows)
        attn.v_proj = _linear(attn.v_proj, rows=kvrows)
        attn.o_proj = _linear(attn.o_proj, cols=qcols, weight=o)
        attn.num_key_value_groups = heads.numel() // groups.numel()
        for name, value in (("num_heads", heads.numel()), ("num_key_value_heads", groups.numel())):
            if hasattr(attn, name):
                setattr(attn, name, int(value))


def _scatter(t: torch.Tensor, idx: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.index_copy_(dim, idx.to(t.device), t)
    return out


def pad_state_hook(dims: Dims, channels: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor):
    """A state-dict post hook for one block: its narrow linears written back at their dense shapes, with
    zeros in the removed rows / columns (the same function: a zero FFN channel or a head whose o_proj
    columns are zero adds nothing)."""
    qcols = head_columns(heads, dims.head_dim)
    kvrows = head_columns(groups, dims.head_dim)
    ffn, Q, KV = dims.intermediate, dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    # (state-dict suffix, kept indices, dense size, dimension)
    rules = [("mlp.gate_proj.weight", channels, ffn, 0), ("mlp.up_proj.weight", channels, ffn, 0),
             ("mlp.down_proj.weight", channels, ffn, 1), ("mlp.gate_proj.bias", channels, ffn, 0),
             ("mlp.up_proj.bias", channels, ffn, 0),
             ("self_attn.q_proj.weight", qcols, Q, 0), ("self_attn.q_proj.bias", qcols, Q, 0),
             ("self_attn.k_proj.weight", kvrows, KV, 0), ("self_attn.k_proj.bias", kvrows, KV, 0),
             ("self_attn.v_proj.weight", kvrows, KV, 0), ("self_attn.v_proj.bias", kvrows, KV, 0),
             ("self_attn.o_proj.weight", qcols, Q, 1)]

    def hook(_module, state_dict, prefix, _meta):
        for suffix, idx, size, dim in rules:
            key = prefix + suffix
            t = state_dict.get(key)
            if t is not None and t.shape[dim] == idx.numel() < size:
                state_dict[key] = _scatter(t, idx, size, dim)

    return hook
