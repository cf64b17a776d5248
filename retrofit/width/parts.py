"""What width narrows in a block, per family, from the arch roles (retrofit/arch/README.md): which rows of which
projections one FFN channel or one attention head owns, and the dense block shape.

- FFN channel j: rows j of `gate` and `up` (gated), rows j and m + j of a fused `gate_up` (Phi-3: gate, then up),
  or row j of `up` and its bias (two-matrix MLPs: OPT, GPT-NeoX, GPT-2); always column j of `down`.
- Head h (KV group g): its head_dim rows of `q` (of `k`, `v`), or of a fused `qkv`: q, then k, then v blocks
  (Phi-3, GPT-2) or [q, k, v] per head (GPT-NeoX); always its head_dim columns of `o`.

Every weight is handled as [out, in]; GPT-2's `Conv1D` stores [in, out] (`out_in`, `to_module` turn it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import arch
from ..arch import is_conv1d
from ..arch import linear_weight as out_in  # the module's weight as [out, in] (a view of a Conv1D's transpose)
from ..errors import UsageError
from .shapes import Dims


def to_module(mod: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """An [out, in] weight in the module's own layout."""
    return w.T.contiguous() if is_conv1d(mod) else w


def out_dim(mod_or_conv1d) -> int:
    """The weight dimension that indexes outputs (0 for nn.Linear, 1 for Conv1D)."""
    conv = mod_or_conv1d if isinstance(mod_or_conv1d, bool) else is_conv1d(mod_or_conv1d)
    return 1 if conv else 0


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Columns of o (rows of q) of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


@dataclass(frozen=True)
class Parts:
    """One family's projections as width sees them (`mlp`: gated, gate_up or plain; `qkv`: separate, blocks or
    per_head)."""

    roles: dict
    mlp: str
    qkv: str
    conv1d: bool
    ffn_key: str
    head_dim_key: bool

    def module(self, block, role: str) -> torch.nn.Module:
        return arch.find(block, self.roles[role])

    def down(self, block) -> torch.nn.Module:
        return self.module(block, "down")

    def o(self, block) -> torch.nn.Module:
        return self.module(block, "o")

    def ffn_rows(self, channels: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
        """Role -> the output rows the kept `channels` own (the down projection's columns are `channels`)."""
        if self.mlp == "gate_up":
            return {"gate_up": torch.cat([channels, channels + dims.intermediate])}
        return {"gate": channels, "up": channels} if self.mlp == "gated" else {"up": channels}

    def attn_rows(self, heads: torch.Tensor, groups: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
        """Role -> the output rows the kept query `heads` and KV `groups` own (o's columns: `head_columns`)."""
        hd = dims.head_dim
        q, kv = head_columns(heads, hd), head_columns(groups, hd)
        if self.qkv == "separate":
            return {"q": q, "k": kv, "v": kv}
        if self.qkv == "per_head":  # GPT-NeoX: view(..., heads, 3 · head_dim), multi-head only
            return {"qkv": head_columns(heads, 3 * hd)}
        Q, KV = dims.heads * hd, dims.kv_heads * hd
        return {"qkv": torch.cat([q, Q + kv, Q + KV + kv])}

    def all_rows(self, dims: Dims) -> dict[str, torch.Tensor]:
        """Role -> every output row a dense block narrows (its dense size is the count)."""
        every = torch.arange(dims.heads)
        return {**self.ffn_rows(torch.arange(dims.intermediate), dims),
                **self.attn_rows(every, torch.arange(dims.kv_heads), dims)}


def parts_of(model, where: str) -> Parts:
    """The model's parts, or a one-line refusal naming what width cannot narrow."""
    lay = arch.layout(model)
    roles = dict(lay.roles)
    if lay.moe:
        raise arch.refuse(model, where, f"width does not narrow MoE experts (role 'experts': {roles['experts']})")
    mlp = "gated" if {"gate", "up"} <= set(roles) else "gate_up" if "gate_up" in roles else "plain"
    qkv = "separate" if {"q", "k", "v"} <= set(roles) else "per_head" if lay.qkv_per_head else "blocks"
    need = {"o", "down", *({"q", "k", "v"} if qkv == "separate" else {"qkv"})}
    need |= {"gated": {"gate", "up"}, "gate_up": {"gate_up"}, "plain": {"up"}}[mlp]
    if need - set(roles):
        raise arch.refuse(model, where, f"width needs the roles {', '.join(sorted(need))}; its blocks have "
                                        f"{', '.join(roles)}")
    return Parts({r: roles[r] for r in need}, mlp, qkv, lay.conv1d, lay.ffn_key, lay.head_dim_key)


def dims_of(model, where: str) -> tuple[Dims, Parts]:
    """The dense block shape and parts, after checking every block has them at that shape."""
    parts = parts_of(model, where)
    c = arch.text_config(model.config)
    try:
        heads, hidden = c.num_attention_heads, c.hidden_size
        inter = getattr(c, parts.ffn_key, None) or 4 * hidden  # GPT-2: n_inner None means 4 × hidden
        dims = Dims(hidden, int(inter), heads, arch.kv_heads(c), arch.head_dim(c),
                    2 if parts.mlp == "plain" else 3)
    except AttributeError as e:
        raise UsageError(f"{where}: the config lacks a shape key width needs ({e})") from None
    if dims.heads % dims.kv_heads:
        raise UsageError(f"{where}: {dims.heads} heads do not split over {dims.kv_heads} KV heads")
    want = {r: len(rows) for r, rows in parts.all_rows(dims).items()}
    want_in = {"down": dims.intermediate, "o": dims.heads * dims.head_dim}
    for b, blk in enumerate(arch.decoder_layers(model)):
        for role, path in parts.roles.items():
            mod = arch.find(blk, path)
            if mod is None or not arch.is_linear(mod):
                raise UsageError(f"{where}: block {b} has no {path} linear (role '{role}')")
            o_, i_ = out_in(mod).shape
            if (role in want and o_ != want[role]) or (role in want_in and i_ != want_in[role]):
                raise UsageError(f"{where}: block {b} {path} is [{o_}, {i_}], not the config's dense shape "
                                 "(already narrowed?)")
    return dims, parts
