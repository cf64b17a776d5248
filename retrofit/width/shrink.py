"""Make a block physically narrower (smaller linears, or GPT-2's Conv1D), and the inverse for exports whose
widths differ per block: the state dict padded back to the dense shapes with zeros. Which rows each channel and
head owns comes from the family's parts (parts.py).

transformers' attentions take their head count from the q/k/v outputs (`view(..., -1, head_dim)`) and read only
a few attributes from the module, which a narrower one updates where it has them: `num_key_value_groups`
(repeat_kv), `num_heads` (OPT's view), `num_key_value_heads`, `split_size` (GPT-2 splits c_attn's output by
it). Phi-3 reads its query width from `config.num_attention_heads`: a narrowed attention with a fused q|k|v
gets its own copy of the config.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import arch
from .parts import Parts, head_columns, out_dim, out_in, to_module
from .shapes import Dims


def narrow(old: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
           weight: torch.Tensor | None = None) -> nn.Module:
    """A copy of `old` (nn.Linear or Conv1D) keeping output `rows` (and their bias) and input `cols`; `weight`
    ([out, in]) replaces the kept weight (the refit)."""
    w = out_in(old)
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    if weight is not None:
        w = weight.to(w.device, w.dtype)  # a refit read from the plan's tensors (CPU) onto the model's device
    if isinstance(old, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    else:  # Conv1D(nf = outputs, nx = inputs), weight [in, out]
        new = type(old)(w.shape[0], w.shape[1]).to(device=w.device, dtype=w.dtype)
    new.weight.data.copy_(to_module(old, w))
    if old.bias is not None:
        new.bias.data.copy_(old.bias.detach()[rows] if rows is not None else old.bias.detach())
    new.train(old.training)
    return new


def _replace(block: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(arch.find(block, parent), name, new)


def _set_heads(attn: nn.Module, heads: int, kv: int, head_dim: int, own_config: bool) -> None:
    attn.num_key_value_groups = heads // kv
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv), ("split_size", heads * head_dim)):
        if hasattr(attn, name):
            setattr(attn, name, int(value))
    cfg = getattr(attn, "config", None)
    if own_config and getattr(cfg, "num_attention_heads", heads) != heads:
        attn.config = copy.copy(cfg)  # Phi-3 slices its fused qkv by config.num_attention_heads
        attn.config.num_attention_heads, attn.config.num_key_value_heads = heads, kv


@torch.no_grad()
def shrink_block(block, parts: Parts, dims: Dims, channels: torch.Tensor, heads: torch.Tensor,
                 groups: torch.Tensor, down: torch.Tensor | None = None, o: torch.Tensor | None = None) -> None:
    """Keep the given FFN channels, query heads and KV groups (ascending indices); `down` / `o` ([out, in])
    replace the kept columns of the down / o projection (the least-squares refit)."""
    if channels.numel() < dims.intermediate or down is not None:
        for role, rows in parts.ffn_rows(channels, dims).items():
            _replace(block, parts.roles[role], narrow(parts.module(block, role), rows=rows))
        _replace(block, parts.roles["down"], narrow(parts.down(block), cols=channels, weight=down))
        owner = arch.find(block, parts.roles["down"].rpartition(".")[0])
        if owner is not block and hasattr(owner, "intermediate_size"):
            owner.intermediate_size = int(channels.numel())
    if heads.numel() < dims.heads or o is not None:
        for role, rows in parts.attn_rows(heads, groups, dims).items():
            _replace(block, parts.roles[role], narrow(parts.module(block, role), rows=rows))
        _replace(block, parts.roles["o"], narrow(parts.o(block), cols=head_columns(heads, dims.head_dim),
                                                 weight=o))
        attn = arch.find(block, parts.roles["o"].rpartition(".")[0])
        _set_heads(attn, heads.numel(), groups.numel(), dims.head_dim, parts.qkv == "blocks")


def _scatter(t: torch.Tensor, idx: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.index_copy_(dim, idx.to(t.device), t)
    return out


def pad_state_hook(parts: Parts, dims: Dims, channels: torch.Tensor, heads: torch.Tensor, groups: torch.Tensor):
    """A state-dict post hook for one block: its narrow linears written back at their dense shapes, with
    zeros in the removed rows / columns (the same function: a zero FFN channel or a head whose o columns
    are zero adds nothing)."""
    full = parts.all_rows(dims)
    od = out_dim(parts.conv1d)
    rows = {**parts.ffn_rows(channels, dims), **parts.attn_rows(heads, groups, dims)}
    # (state-dict suffix, kept indices, dense size, dimension)
    rules = []
    for role, idx in rows.items():
        rules += [(parts.roles[role] + ".weight", idx, len(full[role]), od), (parts.roles[role] + ".bias", idx,
                                                                            len(full[role]), 0)]
    rules += [(parts.roles["down"] + ".weight", channels, dims.intermediate, 1 - od),
              (parts.roles["o"] + ".weight", head_columns(heads, dims.head_dim), dims.heads * dims.head_dim, 1 - od)]

    def hook(_module, state_dict, prefix, _meta):
        for suffix, idx, size, dim in rules:
            key = prefix + suffix
            t = state_dict.get(key)
            if t is not None and t.shape[dim] == idx.numel() < size:
                state_dict[key] = _scatter(t, idx, size, dim)

    return hook
