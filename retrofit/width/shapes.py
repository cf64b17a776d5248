"""Widths and their MACs: what one block may keep, and the candidate widths of each sublayer.

A block's width is (FFN channels, KV groups kept, query heads per kept group). Every kept group keeps the
same number of query heads, so GQA's repeat_kv (query head i reads KV head i // r) stays valid.
MACs per token of a block's linears (q, k, v, o, gate, up, down), as arch.dense_reference counts them:

    attention(g, r) = d · hd · (2·g·r + 2·g)        mlp(c) = 3 · d · c   (2 · d · c for a two-matrix MLP)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    """The dense shape of one block."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_matrices: int = 3  # gate, up, down (a fused gate_up counts as two); 2: up, down (OPT, GPT-NeoX, GPT-2)

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads

    def attn_macs(self, groups: int, per_group: int) -> int:
        return self.hidden * self.head_dim * (2 * groups * per_group + 2 * groups)

    def mlp_macs(self, channels: int) -> int:
        return self.mlp_matrices * self.hidden * channels

    def dense(self) -> BlockWidth:
        return BlockWidth(self.intermediate, self.kv_heads, self.per_group)

    def macs(self, w: BlockWidth) -> int:
        return self.attn_macs(w.kv_groups, w.per_group) + self.mlp_macs(w.channels)

    @property
    def block_macs(self) -> int:
        return self.macs(self.dense())


@dataclass(frozen=True)
class BlockWidth:
    channels: int
    kv_groups: int
    per_group: int

    @property
    def heads(self) -> int:
        return self.kv_groups * self.per_group

    def to_dict(self) -> dict:
        return {"channels": self.channels, "kv_groups": self.kv_groups, "per_group": self.per_group}


def mlp_options(dims: Dims, levels: int, max_removed: float, multiple: int, extra=()) -> list[int]:
    """FFN channel counts, widest first: removed share evenly spaced over [0, max_removed], rounded down to
    a multiple of `multiple` (never below one multiple), plus `extra` counts (e.g. the uniform width)."""
    step = min(multiple, dims.intermediate)
    out = {dims.intermediate, *extra}
    for k in range(levels):
        keep = dims.intermediate * (1 - max_removed * k / (levels - 1))
        out.add(max(step, int(keep) // step * step))
    return sorted((c for c in out if 0 < c <= dims.intermediate), reverse=True)


def attn_options(dims: Dims, kv_groups: bool, max_removed: float = 1.0) -> list[tuple[int, int]]:
    """(KV groups, heads per group) pairs, most MACs first; whole groups go only when `kv_groups`."""
    groups = range(1, dims.kv_heads + 1) if kv_groups else [dims.kv_heads]
    full = dims.attn_macs(dims.kv_heads, dims.per_group)
    opts = [(g, r) for g in groups for r in range(1, dims.per_group + 1)
            if dims.attn_macs(g, r) >= (1 - max_removed) * full - 1e-9 or (g, r) == (dims.kv_heads, dims.per_group)]
    return sorted(opts, key=lambda gr: (-dims.attn_macs(*gr), -gr[0]))


def uniform_width(dims: Dims, fraction: float, prune: str, kv_groups: bool, multiple: int) -> BlockWidth:
    """The same width in every block removing at least `fraction` of the block MACs: attention loses the
    largest share not above `fraction` that its head grid allows, the FFN removes the rest (rounded to
    whole multiples of channels, so the achieved share is at least the target)."""
    full = dims.block_macs
    budget = (1 - fraction) * full
    if prune == "mlp":
        g, r = dims.kv_heads, dims.per_group
    else:
        att_full = dims.attn_macs(dims.kv_heads, dims.per_group)
        cands = attn_options(dims, kv_groups)
        if prune == "attention":
            fit = [gr for gr in cands if dims.attn_macs(*gr) + dims.mlp_macs(dims.intermediate) <= budget + 1e-9]
            if not fit:
                raise ValueError(f"{fraction:g} of the block MACs cannot be removed from attention alone")
            g, r = fit[0]
            return BlockWidth(dims.intermediate, g, r)
        ok = [gr for gr in cands if 1 - dims.attn_macs(*gr) / att_full <= fraction + 1e-9]
        g, r = ok[-1]
    left = budget - dims.attn_macs(g, r)
    step = min(multiple, dims.intermediate)
    c = int(left / dims.mlp_macs(1) + 1e-9) // step * step
    c = min(c, dims.intermediate)
    if c < step:
        raise ValueError(f"removing {fraction:g} of the block MACs leaves the FFN under {step} channels")
    return BlockWidth(c, g, r)


def check_width(dims: Dims, w: BlockWidth) -> str | None:
    """Why `w` is not a valid width of a block of `dims` (None: valid)."""
    if w.channels < 1:
        return "leaves no FFN channels"
    if w.channels > dims.intermediate:
        return f"keeps {w.channels} FFN channels, the model has {dims.intermediate}"
    if w.kv_groups < 1 or w.per_group < 1:
        return "leaves no attention heads"
    if w.kv_groups > dims.kv_heads:
        return f"keeps {w.kv_groups} KV heads, the model has {dims.kv_heads}"
    if w.per_group > dims.per_group:
        return f"keeps {w.per_group} query heads per KV group, the model has {dims.per_group}"
    return None


def explicit_width(dims: Dims, channels: int | None, heads: int | None,
                   kv: int | None) -> tuple[BlockWidth, str | None]:
    """The width an explicit uniform architecture asks for, and the key at fault (None: valid)."""
    kv = dims.kv_heads if kv is None else kv
    heads = (dims.per_group * kv) if heads is None else heads
    if heads % kv:
        return BlockWidth(0, kv, 0), f"num_heads: {heads} query heads cannot split evenly over {kv} KV heads (GQA)"
    w = BlockWidth(dims.intermediate if channels is None else channels, kv, heads // kv)
    why = check_width(dims, w)
    if why is None:
        return w, None
    key = "intermediate_size" if "FFN" in why else ("num_kv_heads" if "KV heads" in why else "num_heads")
    return w, f"{key}: {why}"
