"""The `shards` plan: the adapter's settings and the (d_in, d_out) of each target. Its tensors (the stage's, or
heal's under `adapter.`) are `pool.{t}.a|b` and `index.{t}.a|b` (MoS) or `lora.{t}.a|b` (LoRA; a 3-D experts
target's have an experts axis after the block's)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ..errors import UsageError
from ..plan import Plan
from .config import Target

MOS_KEYS = ("equivalent_rank", "shards_per_vector", "private_rank", "pool_shards", "index_dtype", "subset_selection",
            "pair_dissociation", "vector_sharding")


def trainable_params(method: str, rank: int, equivalent_rank: int | None, num_layers: int,
                     shapes: dict[str, tuple[int, int] | list[int]],
                     block_shapes: dict[str, list[list[int]]] | None = None,
                     experts: dict[str, list[int]] | None = None) -> int:
    """Adapter parameters: MoS holds the parameters of a rank-`equivalent_rank` LoRA, LoRA those of its rank
    (with per-block shapes, each block's own; the zero padding of the stored tensors is not trained); a 3-D
    experts target holds one LoRA per expert."""
    if block_shapes:
        return rank * sum(d_in + d_out for dims in block_shapes.values() for d_in, d_out in dims)
    per_rank = sum((d_in + d_out) * (experts or {}).get(t, [1])[0] for t, (d_in, d_out) in shapes.items())
    return (equivalent_rank if method == "mos" else rank) * num_layers * per_rank


def rank_macs(shapes: dict[str, tuple[int, int] | list[int]], experts: dict[str, list[int]] | None = None) -> dict:
    """Target -> adapter MACs per token per unit of rank in one block: d_in + d_out for a linear, and for a 3-D
    experts target that times the experts a token passes (top_k), as arch/reference.py counts the experts."""
    return {t: (d_in + d_out) * (experts or {}).get(t, [1, 1])[1] for t, (d_in, d_out) in shapes.items()}


class ShardsPlan(Plan):
    method: Literal["mos", "lora"]
    rank: int = Field(ge=1)
    alpha: float
    scaling: float
    dropout: float = Field(ge=0, lt=1)
    dtype: Literal["float32", "bfloat16"]
    targets: list[Target] = Field(min_length=1)
    num_layers: int = Field(ge=1)
    shapes: dict[Target, list[int]]
    # LoRA after per-block widths only: each block's [d_in, d_out] (`shapes` is then the largest of each)
    block_shapes: dict[Target, list[list[int]]] | None = None
    # 3-D experts targets only (LoRA): [experts, experts a token passes (top_k)]; `shapes` is one expert's
    experts: dict[Target, list[int]] | None = None
    # MoS only (absent from a LoRA plan)
    equivalent_rank: int | None = Field(None, ge=1)
    shards_per_vector: int | None = Field(None, ge=1)
    private_rank: int | None = Field(None, ge=0)
    pool_shards: int | None = Field(None, ge=1)
    index_dtype: Literal["uint8", "int16", "int32", "int64"] | None = None
    subset_selection: bool | None = None
    pair_dissociation: bool | None = None
    vector_sharding: bool | None = None
    trainable_params: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if list(self.shapes) != list(self.targets):
            raise ValueError(f"shapes: holds {list(self.shapes)}, targets are {self.targets}")
        for t, dims in self.shapes.items():
            if len(dims) != 2 or min(dims) < 1:
                raise ValueError(f"shapes.{t}: {dims} is not [d_in, d_out]")
        if self.block_shapes is not None:
            if self.method == "mos":
                raise ValueError("block_shapes: a MoS pool holds one shape per target")
            if list(self.block_shapes) != list(self.targets):
                raise ValueError(f"block_shapes: holds {list(self.block_shapes)}, targets are {self.targets}")
            for t, dims in self.block_shapes.items():
                big = self.shapes[t]
                if len(dims) != self.num_layers or any(len(d) != 2 or not 1 <= d[0] <= big[0] or not 1 <= d[1] <= big[1]
                                                       for d in dims):
                    raise ValueError(f"block_shapes.{t}: needs {self.num_layers} [d_in, d_out] pairs within {big}")
        for t, ek in (self.experts or {}).items():
            if t not in self.shapes or len(ek) != 2 or not 1 <= ek[1] <= ek[0]:
                raise ValueError(f"experts.{t}: {ek} is not [experts, top_k] of a target")
            if self.method == "mos" or self.block_shapes is not None:
                raise ValueError(f"experts.{t}: 3-D experts targets take one shape, method lora")
        given = [k for k in MOS_KEYS if getattr(self, k) is not None]
        if self.method == "mos" and len(given) != len(MOS_KEYS):
            raise ValueError(f"{next(k for k in MOS_KEYS if k not in given)}: missing (method mos)")
        if self.method == "lora" and given:
            raise ValueError(f"{given[0]}: a MoS key in a lora plan")
        if not math.isclose(self.scaling, self.alpha / self.rank):
            raise ValueError(f"scaling: {self.scaling} is not alpha / rank = {self.alpha / self.rank}")
        want = trainable_params(self.method, self.rank, self.equivalent_rank, self.num_layers, self.shapes,
                                self.block_shapes, self.experts)
        if self.trainable_params != want:
            raise ValueError(f"trainable_params: {self.trainable_params}, the shapes and ranks give {want}")
        return self

    def tensor_names(self) -> list[str]:
        kinds = ("pool", "index") if self.method == "mos" else ("lora",)
        return [f"{k}.{t}.{s}" for t in self.targets for k in kinds for s in ("a", "b")]

    def check_tensors(self, tensors: dict) -> None:
        """Every adapter tensor of the plan is there, with the planned shape."""
        missing = [k for k in self.tensor_names() if k not in tensors]
        if missing:
            raise UsageError(f"shards: adapter tensors missing: {', '.join(missing[:3])}")
        n, r = self.num_layers, self.rank
        for t, (d_in, d_out) in self.shapes.items():
            if self.method == "mos":
                p, sh = self.pool_shards, self.shards_per_vector
                want = {f"pool.{t}.a": (p, d_in // sh), f"pool.{t}.b": (p, d_out // sh)}
            elif t in (self.experts or {}):  # one LoRA per expert
                e = self.experts[t][0]
                want = {f"lora.{t}.a": (n, e, r, d_in), f"lora.{t}.b": (n, e, d_out, r)}
            else:
                want = {f"lora.{t}.a": (n, r, d_in), f"lora.{t}.b": (n, d_out, r)}
            for k, shape in want.items():
                if tuple(tensors[k].shape) != shape:
                    raise UsageError(f"shards: adapter tensor {k} has shape {tuple(tensors[k].shape)}, the plan "
                                     f"needs {shape}")
