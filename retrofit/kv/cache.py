"""A KV cache whose layers really hold fewer tokens, on transformers' Cache API.

Each `BudgetedLayer` (layer.py) keeps the tokens it has *seen* (`seen`, what `get_seq_length` returns, so new
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

import numpy as np
import torch
from transformers.cache_utils import Cache

from adaflex.search import kv_alloc

from .layer import BudgetedLayer
from .policies import layer_preference
from .spec import KVSpec


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
    def track(self) -> None:
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
            if spec.total(layer.seen) >= spec.held(layer.seen).sum():
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
        if self.frozen:
            return
        layer.slide()  # a sliding layer's keys out of its window are never seen again: they leave first
        if not spec.is_full:
            self._budget(layer, probs, groups, mass)
        if layer.window:  # what later queries can see: window - 1 tokens at most
            cap = layer.window - 1
            layer.shrink(min(cap, layer.capacity or cap), layer.head_caps and [min(cap, c) for c in layer.head_caps])

    def _budget(self, layer: BudgetedLayer, probs, groups, mass) -> None:
        if mass is not None:  # a prompt may arrive in chunks: keep summing until it is compressed
            old = layer.mass
            if old is not None:
                mass = mass.clone()
                mass[..., : old.shape[-1]] += old
            layer.mass, layer.mass_queries = mass, layer.mass_queries + layer.fresh
        if layer.capacity is None:
            self._prefill(layer, probs, groups)
        else:
            self._decode(layer, probs, groups)

    def _prefill(self, layer: BudgetedLayer, probs, groups) -> None:
        # counts follow the prompt length (`seen`; a sliding layer stores fewer: `slide`), scores the stored slots
        spec, k, length = self.spec, layer.stored, layer.seen
        total = spec.total(length)
        if total >= spec.held(length).sum():
            return  # nothing to evict yet: stays uncompressed, later forwards reconsider
        if spec.policy.needs_attention:
            mass = None if layer.mass is None else layer.mass / max(1, layer.mass_queries)
            kw = {"values": layer.full_precision()[1]} if spec.policy.needs_values else {}
            layer.scores = spec.policy.score(probs, groups, k, mass, **kw).float()
            layer.mass = None  # decisions from here on use the running scores
        if spec.cascades:
            self._cascade(layer, probs, total)
            return
        if self._counts is None or self._counts[0] != length:  # per layer [L], or per KV head [L, H]
            heads = spec.static_head_counts(length)
            self._counts = (length, spec.static_counts(length) if heads is None else heads)
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
        # a sliding layer can hold at most window - 1: what CAKE would give it beyond goes to the others
        lengths = np.array([self.layers[j].holdable for j in seen])
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
        spec, q = self.spec, layer.fresh
        if layer.scores is not None and probs is not None:
            a = spec.policy.running(probs, groups).float()  # [B, H, K]
            lam = 1.0 / max(1, spec.window)
            old = layer.scores[..., :-q] if q else layer.scores
            old.mul_(1 - lam).add_(lam * a[..., : old.shape[-1]])
            if q:
                layer.scores[..., -q:] = a[..., -q:]
        if spec.decode and (layer.stored > layer.capacity or layer.head_caps is not None):
            layer.shrink(layer.capacity, layer.head_caps)
