"""A KV cache whose layers really hold fewer tokens, on transformers' Cache API.

Each `BudgetedLayer` keeps the tokens it has *seen* (`seen`, what `get_seq_length` returns, so new
tokens get the right positions) apart from the tokens it *stores* (`keys`/`values` [B, H, K, D]); K
differs from layer to layer. `valid` [B, H, K] marks stored slots that are real tokens (padding
is stored but never attended), so per-KV-head kept lengths are `valid.sum(-1)`. `compact(indices)`
gathers the kept positions per (batch row, KV head) with the `kv_compact` kernel.

A plan may also give the KV heads of a layer different counts (`head_fractions`: on SmolLM2 what a layer
gains from its full cache sits in one of its three heads). Such a layer stores each head apart ([B, 1, K_h, D]
each: no head pays for another's length) and hands attention a transient copy left-padded to the longest head,
with the padding marked invalid, as it hands over dequantized copies of int8 storage.

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


def _per_head(t) -> list[torch.Tensor]:
    return t if isinstance(t, list) else list(t.split(1, dim=1))


def _padded(t):
    """Per-head storage (a list of [B, 1, K_h, x]) as one [B, H, max K_h, x] tensor, left-padded with zeros."""
    if not isinstance(t, list):
        return t
    k = max(p.shape[-2] for p in t)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, k - p.shape[-2], 0)) for p in t], dim=1)


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
    head_fractions: list[list[float]] | None = None  # or per (layer, KV head): heads keep different counts
    storage: str = "model"  # element type of the stored keys/values: model, float16, bfloat16, int8
    bytes_per_value: float = 1.0  # stored bytes per value relative to the model's dtype (int8: + scales)
    extra: dict = field(default_factory=dict)

    @property
    def token_fraction(self) -> float:
        """Share of the tokens kept: the byte budget divided by the bytes each stored token costs."""
        return min(1.0, self.budget / self.bytes_per_value) if self.budget is not None else 1.0

    @property
    def cascades(self) -> bool:
        """CAKE's run-time allocation (no static plan, per layer or per head, given)."""
        return self.allocation == "cake" and self.fractions is None and self.head_fractions is None

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

    def static_head_counts(self, length: int) -> np.ndarray | None:
        """Per (layer, KV head) token counts of a per-head plan [L, H] (sum = total · H), None without one."""
        if self.head_fractions is None:
            return None
        f = np.asarray(self.head_fractions, dtype=np.float64)
        counts = kv_alloc.plan_counts(f.ravel(), length, total=self.total(length) * f.shape[1],
                                      min_keep=min(self.floor, length))
        return counts.reshape(f.shape)


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
        self.head_caps: list[int] | None = None  # per KV head, when a per-head plan gives them different sizes
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
            incoming = {"keys": kq, "values": vq, "k_scale": ks, "v_scale": vs}
        else:
            if storage != "model":
                key_states, value_states = key_states.to(_DTYPES[storage]), value_states.to(_DTYPES[storage])
            incoming = {"keys": key_states, "values": value_states}
        for name, t in incoming.items():
            old = getattr(self, name)
            if isinstance(old, list):  # per-head storage: each head gets its new tokens
                setattr(self, name, [torch.cat([p, t[:, j:j + 1]], dim=-2) for j, p in enumerate(old)])
            else:
                setattr(self, name, t if old is None or not old.numel() else torch.cat([old.to(t.dtype), t], dim=-2))
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
        """The stored keys and values [B, H, K, D] in the model's dtype (a transient copy unless stored as is;
        per-head storage is left-padded to the longest head)."""
        keys, values, ks, vs = (_padded(t) for t in (self.keys, self.values, self.k_scale, self.v_scale))
        if ks is not None:
            return (keys.to(self.dtype) * ks).to(self.dtype), (values.to(self.dtype) * vs).to(self.dtype)
        if self.dtype is not None and keys.dtype != self.dtype:
            return keys.to(self.dtype), values.to(self.dtype)
        return keys, values

    @property
    def ragged(self) -> bool:
        """Heads are stored apart (they keep different numbers of tokens)."""
        return isinstance(self.keys, list)

    def head_lengths(self) -> list[int]:
        """Slots stored per KV head."""
        if self.ragged:
            return [p.shape[-2] for p in self.keys]
        return [self.stored] * (self.keys.shape[1] if self.is_initialized else 0)

    def _storage_names(self) -> list[str]:
        return ["keys", "values"] + (["k_scale", "v_scale"] if self.k_scale is not None else [])

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.seen, self.valid, self.scores, self.capacity, self.heads_uniform = 0, None, None, None, True
        self.head_caps = None
        self.mass, self.mass_queries = None, 0
        self.keys = self.values = self.k_scale = self.v_scale = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.capacity is not None or tokens_to_remove > 0 or self.ragged:
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
        for name in self._storage_names():
            t = getattr(self, name)
            setattr(self, name, [fn(p) for p in t] if isinstance(t, list) else fn(t))
        self.valid = fn(self.valid)
        if self.scores is not None:
            self.scores = fn(self.scores)
        if self.mass is not None:
            self.mass = fn(self.mass)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    # -- what it holds --
    @property
    def stored(self) -> int:
        if not self.is_initialized:
            return 0
        return max(p.shape[-2] for p in self.keys) if self.ragged else self.keys.shape[-2]

    def kept_lengths(self) -> torch.Tensor:
        """Real tokens kept per (batch row, KV head): [B, H]."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        parts = [p for name in self._storage_names() for p in _per_head(getattr(self, name))]
        return sum(p.numel() * p.element_size() for p in parts)

    def bookkeeping_bytes(self) -> int:
        n = 0 if self.valid is None else self.valid.numel()
        return n + (0 if self.scores is None else self.scores.numel() * 4)

    # -- eviction --
    def compact(self, indices: torch.Tensor) -> None:
        """Keep stored positions `indices` [B, H, K'] (ascending per row and head) of this layer."""
        if self.ragged:
            raise RuntimeError("compact: heads are stored apart; use compact_heads")
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

    def compact_heads(self, indices: list[torch.Tensor]) -> None:
        """Keep, for each KV head h, its stored positions `indices[h]` [B, K_h] (ascending, counted within the
        head's own slots); heads may keep different counts, then they are stored apart."""
        k, lengths = self.stored, self.head_lengths()
        counts = [int(i.shape[-1]) for i in indices]
        new_k = max(counts)
        valid = self.valid.new_zeros(self.valid.shape[0], len(indices), new_k)
        scores = None if self.scores is None else self.scores.new_zeros(valid.shape)
        stored = {name: _per_head(getattr(self, name)) for name in self._storage_names()}
        for name in stored:
            setattr(self, name, [])
        for j, (idx, n) in enumerate(zip(indices, lengths, strict=True)):
            idx = idx.to(self.device)[:, None]  # [B, 1, K_h]
            part = slice(k - n, k)  # head j's slots in the left-padded layout
            for a, b in (("keys", "values"), ("k_scale", "v_scale")):
                if a in stored:
                    for name, t in zip((a, b), compact_kv(stored[a][j], stored[b][j], idx), strict=True):
                        getattr(self, name).append(t)
            valid[:, j, new_k - idx.shape[-1]:] = torch.gather(self.valid[:, j, part], 1, idx[:, 0])
            if scores is not None:
                scores[:, j, new_k - idx.shape[-1]:] = torch.gather(self.scores[:, j, part], 1, idx[:, 0])
        self.valid, self.scores = valid, scores
        if len(set(counts)) == 1:  # equal again: one tensor per kind
            for name in self._storage_names():
                setattr(self, name, torch.cat(getattr(self, name), dim=1))
        self.heads_uniform = False
        self._returned = None
        self.owner._track()

    def shrink(self, count: int, heads: list[int] | None = None) -> None:
        """Keep `count` tokens per (row, KV head), or `heads[h]` for KV head h: sinks and the recent window
        first, then by score."""
        k = self.stored
        lengths = self.head_lengths()
        want = [min(c, n) for c, n in zip(heads or [count] * len(lengths), lengths, strict=True)]
        if want == lengths:
            return
        spec = self.owner.spec
        b, h = self.valid.shape[:2]
        if self.scores is not None:
            s = self.scores.clone()
        else:  # positional (StreamingLLM): later is better
            s = torch.arange(k, dtype=torch.float32, device=self.device).expand(b, h, k).clone()
        recent = min(k, spec.window + int(round(spec.recent * min(want))))
        s[..., k - recent:] = float("inf")
        if spec.sinks:
            rank = self.valid.cumsum(-1)
            s[self.valid & (rank <= spec.sinks)] = float("inf")
        s[~self.valid] = float("-inf")  # padding leaves first
        if not self.ragged and len(set(want)) == 1:
            self.compact(torch.topk(s, want[0], dim=-1, sorted=False).indices.sort(-1).values)
            return
        self.compact_heads([torch.topk(s[:, j, k - n:], c, dim=-1, sorted=False).indices.sort(-1).values
                            for j, (c, n) in enumerate(zip(want, lengths, strict=True))])


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
            need = spec.policy.needs_attention or spec.cascades
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
        if spec.cascades:
            self._cascade(layer, probs, total)
            return
        if self._counts is None or self._counts[0] != k:  # per layer [L], or per KV head [L, H]
            heads = spec.static_head_counts(k)
            self._counts = (k, spec.static_counts(k) if heads is None else heads)
        counts = self._counts[1][layer.budget_idx]
        layer.head_caps = [int(c) for c in counts] if np.ndim(counts) else None
        layer.capacity = int(np.max(counts))
        layer.shrink(layer.capacity, layer.head_caps)

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
        if spec.decode and (layer.stored > layer.capacity or layer.head_caps is not None):
            layer.shrink(layer.capacity, layer.head_caps)
