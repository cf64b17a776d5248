"""A KV cache whose layers really hold fewer tokens, on transformers' Cache API.

Each `BudgetedLayer` keeps the tokens it has *seen* (`seen`, what `get_seq_length` returns, so new
tokens get the right positions) apart from the tokens it *stores* (`keys`/`values` [B, H, K, D]); K
differs from layer to layer. `valid` [B, H, K] marks stored slots that are real tokens (padding
is stored but never attended), so per-KV-head kept lengths are `valid.sum(-1)`. `compact(indices)`
gathers the kept positions per (batch row, KV head) with the `kv_compact` kernel.

What to keep is decided by the `BudgetedCache` right after a layer's attention has run (the
attention function in `attention.py` calls `after_attention`):

- prefill: the first forward that brings a layer over its budget compresses it. Static plans
  (uniform, pyramid, prefixkv, searched, explicit) turn the per-layer fractions into token counts for
  the prompt length; CAKE computes each layer's preference from its own window attention and, after
  every layer, re-allocates the budget over the layers seen so far and re-evicts them (cascading), so
  the cache never holds much more than the total budget plus one uncompressed layer.
- decoding (`decode=True`): each layer keeps its size fixed; tokens arriving later are scored by the
  attention they receive (a running mean) and the lowest-scored unprotected token leaves.

The sinks (first real tokens of each row) and the last `window` tokens are always kept.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from adaflex.kernels.kv_compact import compact_kv
from adaflex.search import kv_alloc

from .policies import Policy, layer_preference

_ACTIVE = threading.local()  # the layer whose update() just ran: the attention function picks it up
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per stored vector (one fp32 scale per token and head): [.., D] -> int8, [.., 1]."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127.0
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8), scale


def storage_bytes_per_value(storage: str, model_dtype: torch.dtype, head_dim: int) -> float:
    """Bytes a stored value costs relative to the model's dtype."""
    model = torch.finfo(model_dtype).bits / 8
    if storage == "model":
        return 1.0
    if storage == "int8":
        return (1 + 4 / head_dim) / model
    return (torch.finfo(_DTYPES[storage]).bits / 8) / model


def active_layer(key: torch.Tensor):
    """The BudgetedLayer that returned `key` from its update, if any (and forget it)."""
    layer = getattr(_ACTIVE, "layer", None)
    _ACTIVE.layer = None
    if layer is not None and layer._returned is key:
        return layer
    return None


@dataclass
class KVSpec:
    """Everything a cache needs, resolved from the stage settings and its plan (JSON-able but the policy)."""

    num_layers: int
    policy: Policy
    budget: float | None = 0.25
    tokens: int | None = None
    allocation: str = "uniform"
    sinks: int = 4
    window: int = 32
    recent: float = 0.0
    floor: int = 36
    beta: float = 20.0
    tau1: float = 1.0
    tau2: float = 1.0
    decode: bool = True
    fractions: list[float] | None = None  # static per-layer plan (prefixkv, searched, explicit)
    storage: str = "model"  # element type of the stored keys/values: model, float16, bfloat16, int8
    bytes_per_value: float = 1.0  # stored bytes per value relative to the model's dtype (int8: + scales)
    extra: dict = field(default_factory=dict)

    @property
    def token_fraction(self) -> float:
        """Share of the tokens kept: the byte budget divided by the bytes each stored token costs."""
        return min(1.0, self.budget / self.bytes_per_value) if self.budget is not None else 1.0

    @property
    def is_full(self) -> bool:
        return self.tokens is None and self.token_fraction >= 1.0

    def mean_count(self, length: int) -> int:
        """Tokens a layer keeps on average for a prompt of `length` tokens."""
        if self.tokens is not None:
            return min(self.tokens, length)
        return min(length, int(round(self.token_fraction * length)))

    def total(self, length: int) -> int:
        lo = min(self.floor, length) * self.num_layers
        return int(min(max(self.mean_count(length) * self.num_layers, lo), length * self.num_layers))

    def static_counts(self, length: int) -> np.ndarray:
        """Per-layer token counts of a static plan for a prompt of `length` tokens (sum = total)."""
        total, floor, n = self.total(length), min(self.floor, length), self.num_layers
        if self.fractions is not None:
            return kv_alloc.plan_counts(self.fractions, length, total=total, min_keep=floor)
        if self.allocation == "pyramid":
            return kv_alloc.pyramid(n, total, beta=self.beta, lengths=length, min_keep=floor)
        return kv_alloc.uniform(n, total, lengths=length, min_keep=floor)


class BudgetedLayer(DynamicLayer):
    """One layer's cache: tokens seen vs stored, validity per (row, KV head, slot), running scores."""

    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, owner: BudgetedCache, budget_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.budget_idx = layer_idx if budget_idx is None else budget_idx  # a repeat slot: its block's budget
        self.owner = owner
        self.seen = 0
        self.valid: torch.Tensor | None = None  # [B, H, K] bool
        self.scores: torch.Tensor | None = None  # [B, H, K] float32 (attention-scored policies)
        self.mass: torch.Tensor | None = None  # [B, 2·Hq, K] attention received (sums of p, p²) over prompt queries
        self.mass_queries = 0
        self.capacity: int | None = None  # fixed size once compressed
        self.heads_uniform = True  # valid is the same for every KV head of a row
        self._returned = None
        self._fresh = 0  # tokens appended by the current forward
        self.k_scale: torch.Tensor | None = None  # int8 storage: one scale per stored vector [B, H, K, 1]
        self.v_scale: torch.Tensor | None = None
        self.dtype = None  # the model's dtype (what update() returns)

    # -- transformers' layer API --
    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.valid = torch.zeros(b, h, 0, dtype=torch.bool, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self.dtype = key_states.dtype
        storage = self.owner.spec.storage
        if storage == "int8":
            kq, ks = _quantize(key_states)
            vq, vs = _quantize(value_states)
            first = self.k_scale is None
            self.keys = kq if first else torch.cat([self.keys, kq], dim=-2)
            self.values = vq if first else torch.cat([self.values, vq], dim=-2)
            self.k_scale = ks if first else torch.cat([self.k_scale, ks], dim=-2)
            self.v_scale = vs if first else torch.cat([self.v_scale, vs], dim=-2)
        else:
            if storage != "model":
                key_states, value_states = key_states.to(_DTYPES[storage]), value_states.to(_DTYPES[storage])
            self.keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
            self.values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
        new = torch.ones(*key_states.shape[:2], q, dtype=torch.bool, device=self.device)
        self.valid = torch.cat([self.valid, new], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(*key_states.shape[:2], q)], dim=-1)
        self.seen += q
        self._fresh = q
        keys, values = self.full_precision()
        self._returned = keys
        self.owner._track()
        _ACTIVE.layer = self
        return keys, values

    def full_precision(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values in the model's dtype (a transient copy unless stored as is)."""
        if self.k_scale is not None:
            return ((self.keys.to(self.dtype) * self.k_scale).to(self.dtype),
                    (self.values.to(self.dtype) * self.v_scale).to(self.dtype))
        if self.dtype is not None and self.keys.dtype != self.dtype:
            return self.keys.to(self.dtype), self.values.to(self.dtype)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.seen, self.valid, self.scores, self.capacity, self.heads_uniform = 0, None, None, None, True
        self.mass, self.mass_queries = None, 0
        self.keys = self.values = self.k_scale = self.v_scale = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.capacity is not None or tokens_to_remove > 0:
            raise RuntimeError("a budgeted KV layer cannot be cropped once it has evicted tokens")
        n = -tokens_to_remove
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        if self.k_scale is not None:
            self.k_scale, self.v_scale = self.k_scale[..., :-n, :], self.v_scale[..., :-n, :]
        self.valid = self.valid[..., :-n]
        if self.scores is not None:
            self.scores = self.scores[..., :-n]
        if self.mass is not None:  # the removed queries' attention stays summed in: a small bias, no error
            self.mass = self.mass[..., :-n]
        self.seen -= n

    def _rows(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values, self.valid = fn(self.keys), fn(self.values), fn(self.valid)
        if self.scores is not None:
            self.scores = fn(self.scores)
        if self.mass is not None:
            self.mass = fn(self.mass)
        if self.k_scale is not None:
            self.k_scale, self.v_scale = fn(self.k_scale), fn(self.v_scale)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    # -- what it holds --
    @property
    def stored(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def kept_lengths(self) -> torch.Tensor:
        """Real tokens kept per (batch row, KV head): [B, H]."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        n = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        if self.k_scale is not None:
            n += (self.k_scale.numel() + self.v_scale.numel()) * self.k_scale.element_size()
        return n

    def bookkeeping_bytes(self) -> int:
        n = 0 if self.valid is None else self.valid.numel()
        return n + (0 if self.scores is None else self.scores.numel() * 4)

    # -- eviction --
    def compact(self, indices: torch.Tensor) -> None:
        """Keep stored positions `indices` [B, H, K'] (ascending per row and head) of this layer."""
        indices = indices.to(self.device)
        self.keys, self.values = compact_kv(self.keys, self.values, indices)
        if self.k_scale is not None:
            self.k_scale, self.v_scale = compact_kv(self.k_scale, self.v_scale, indices)
        self.valid = torch.gather(self.valid, 2, indices)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, 2, indices)
        self.heads_uniform = self.keys.shape[1] == 1 or bool((indices == indices[:, :1]).all())
        self._returned = None
        self.owner._track()

    def shrink(self, count: int) -> None:
        """Keep `count` tokens per (row, KV head): sinks and the recent window first, then by score."""
        k = self.stored
        if count >= k:
            return
        spec = self.owner.spec
        b, h = self.keys.shape[:2]
        if self.scores is not None:
            s = self.scores.clone()
        else:  # positional (StreamingLLM): later is better
            s = torch.arange(k, dtype=torch.float32, device=self.device).expand(b, h, k).clone()
        recent = min(k, spec.window + int(round(spec.recent * count)))
        s[..., k - recent:] = float("inf")
        if spec.sinks:
            rank = self.valid.cumsum(-1)
            s[self.valid & (rank <= spec.sinks)] = float("inf")
        s[~self.valid] = float("-inf")  # padding leaves first
        idx = torch.topk(s, count, dim=-1, sorted=False).indices.sort(-1).values
        self.compact(idx)


class BudgetedCache(Cache):
    """Per-layer budgets and eviction for a whole model (see the module docstring)."""

    def __init__(self, spec: KVSpec):
        super().__init__(layers=[BudgetedLayer(i, self) for i in range(spec.num_layers)])
        self.spec = spec
        self.frozen = False  # True: append only (compress the context, not what comes after)
        self.peak_bytes = 0
        self._counts: tuple[int, np.ndarray] | None = None  # static counts for one prompt length
        self._prefs: dict[int, float] = {}
        self._bytes = [0] * spec.num_layers

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def add_slot(self, like: int) -> BudgetedLayer:
        """One more layer (a repeated block's own cache slot, routes) that takes block `like`'s budget."""
        if not 0 <= like < self.spec.num_layers:
            raise ValueError(f"add_slot: block {like} out of range (the plan has {self.spec.num_layers} layers)")
        layer = BudgetedLayer(len(self.layers), self, budget_idx=like)
        self.layers.append(layer)
        self._bytes.append(0)
        return layer

    # -- memory --
    def _track(self) -> None:
        self._bytes = [layer.nbytes() for layer in self.layers]
        self.peak_bytes = max(self.peak_bytes, sum(self._bytes))

    def stored_bytes(self) -> int:
        """Bytes of the keys and values held now (what `kv_bytes_ratio` counts)."""
        return sum(layer.nbytes() for layer in self.layers)

    def bookkeeping_bytes(self) -> int:
        return sum(layer.bookkeeping_bytes() for layer in self.layers)

    def kept_lengths(self) -> list[torch.Tensor]:
        return [layer.kept_lengths() for layer in self.layers]

    # -- decisions after a layer's attention --
    def probe_queries(self, layer: BudgetedLayer, q: int) -> int:
        """How many of the last new queries `after_attention` needs the attention of (0: none)."""
        spec = self.spec
        if spec.is_full or self.frozen:
            return 0
        if layer.capacity is None:
            if spec.total(layer.stored) >= layer.stored * spec.num_layers:
                return 0
            need = spec.policy.needs_attention or (spec.allocation == "cake" and spec.fractions is None)
            return min(spec.window, q) if need else 0
        return min(q, 256) if spec.policy.needs_attention else 0

    def wants_mass(self, layer: BudgetedLayer) -> bool:
        """Whether `after_attention` needs the attention every new query gave (prompt not compressed yet)."""
        spec = self.spec
        return spec.policy.needs_mass and not (spec.is_full or self.frozen) and layer.capacity is None

    def after_attention(self, layer: BudgetedLayer, probs: torch.Tensor | None, groups: int,
                        mass: torch.Tensor | None = None) -> None:
        """probs: [B, Hq, w, K] attention of the last w new queries over the layer's stored keys; mass:
        [B, 2·Hq, K] attention the keys received from this forward's new queries, per query head: sums of p,
        then of p² (`attention.received_attention`; only when `wants_mass`)."""
        spec = self.spec
        if spec.is_full or self.frozen:
            return
        if mass is not None:  # a prompt may arrive in chunks: keep summing until it is compressed
            old = layer.mass
            if old is not None:
                mass = mass.clone()
                mass[..., : old.shape[-1]] += old
            layer.mass, layer.mass_queries = mass, layer.mass_queries + layer._fresh
        if layer.capacity is None:
            self._prefill(layer, probs, groups)
        else:
            self._decode(layer, probs, groups)

    def _prefill(self, layer: BudgetedLayer, probs, groups) -> None:
        spec, k = self.spec, layer.stored
        total = spec.total(k)
        if total >= k * spec.num_layers:
            return  # nothing to evict yet: stays uncompressed, later forwards reconsider
        if spec.policy.needs_attention:
            mass = None if layer.mass is None else layer.mass / max(1, layer.mass_queries)
            kw = {"values": layer.full_precision()[1]} if spec.policy.needs_values else {}
            layer.scores = spec.policy.score(probs, groups, k, mass, **kw).float()
            layer.mass = None  # decisions from here on use the running scores
        if spec.allocation == "cake" and spec.fractions is None:
            self._cascade(layer, probs, total)
            return
        if self._counts is None or self._counts[0] != k:
            self._counts = (k, spec.static_counts(k))
        count = int(self._counts[1][layer.budget_idx])
        layer.capacity = count
        layer.shrink(count)

    def _cascade(self, layer: BudgetedLayer, probs, total: int) -> None:
        """CAKE: preference of this layer, budgets of all layers seen so far, re-evict them. Layers are met in
        block order; a repeat slot (routes) right after its block, with a budget of its own."""
        spec, i = self.spec, layer.layer_idx

        def order(j: int) -> tuple[int, bool]:
            return self.layers[j].budget_idx, j >= spec.num_layers

        if not self._prefs or order(i) <= max(order(j) for j in self._prefs):
            self._prefs = {}  # a new prompt
        h, v = layer_preference(probs, spec.window)
        self._prefs[i] = float(kv_alloc.cake_preference([h], [v], spec.tau1, spec.tau2)[0])
        seen = sorted(self._prefs, key=order)
        lengths = np.array([self.layers[j].stored for j in seen])
        floor = min(spec.floor, layer.stored)
        repeats = sum(j >= spec.num_layers for j in seen)  # each repeat slot adds one layer's share
        total = total * (spec.num_layers + repeats) // spec.num_layers
        budget = min(total, int(lengths.sum()))
        counts = kv_alloc.cake([self._prefs[j] for j in seen], budget, lengths=lengths,
                               min_keep=np.minimum(floor, lengths))
        for j, c in zip(seen, counts, strict=True):
            self.layers[j].capacity = int(c)
            self.layers[j].shrink(int(c))

    def _decode(self, layer: BudgetedLayer, probs, groups) -> None:
        spec, q = self.spec, layer._fresh
        if layer.scores is not None and probs is not None:
            a = spec.policy.running(probs, groups).float()  # [B, H, K]
            lam = 1.0 / max(1, spec.window)
            old = layer.scores[..., :-q] if q else layer.scores
            old.mul_(1 - lam).add_(lam * a[..., : old.shape[-1]])
            if q:
                layer.scores[..., -q:] = a[..., -q:]
        if spec.decode and layer.stored > layer.capacity:
            layer.shrink(layer.capacity)
