"""One layer of a budgeted KV cache (cache.py): the tokens it has seen apart from those it stores, per-head or
int8 storage, and the gathers that compact it. Its owner, the BudgetedCache, decides what it keeps."""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import Cache, DynamicLayer

from adaflex.kernels.kv_compact import compact_kv

from ..arch.shape import held_tokens
from .spec import STORAGE_DTYPES

_ACTIVE = threading.local()  # the layer whose update() just ran: the attention function picks it up


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per stored vector (one fp32 scale per token and head): [.., D] -> int8, [.., 1]."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127.0
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8), scale


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


class BudgetedLayer(DynamicLayer):
    """One layer's cache: tokens seen vs stored, validity per (row, KV head, slot), running scores."""

    is_sliding = False
    is_croppable = False

    def __init__(self, layer_idx: int, owner: Cache, budget_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.budget_idx = layer_idx if budget_idx is None else budget_idx  # a repeat slot: its block's budget
        self.owner = owner
        self.seen = 0
        self.valid: torch.Tensor | None = None  # [B, H, K] bool
        self.pos: torch.Tensor | None = None  # [B, H, K] long: each slot's index in the sequence seen (sliding windows)
        self.scores: torch.Tensor | None = None  # [B, H, K] float32 (attention-scored policies)
        self.mass: torch.Tensor | None = None  # [B, 2·Hq, K] attention received (sums of p, p²) over prompt queries
        self.mass_queries = 0
        self.capacity: int | None = None  # fixed size once compressed
        self.head_caps: list[int] | None = None  # per KV head, when a per-head plan gives them different sizes
        self.heads_uniform = True  # valid is the same for every KV head of a row
        self._returned = None
        self.fresh = 0  # tokens appended by the current forward
        self.k_scale: torch.Tensor | None = None  # int8 storage: one scale per stored vector [B, H, K, 1]
        self.v_scale: torch.Tensor | None = None
        self.dtype = None  # the model's dtype (what update() returns)

    # -- transformers' layer API --
    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.valid = torch.zeros(b, h, 0, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self.dtype = key_states.dtype
        storage = self.owner.spec.storage
        if storage == "int8":
            kq, ks = quantize(key_states)
            vq, vs = quantize(value_states)
            incoming = {"keys": kq, "values": vq, "k_scale": ks, "v_scale": vs}
        else:
            if storage != "model":
                dtype = STORAGE_DTYPES[storage]
                key_states, value_states = key_states.to(dtype), value_states.to(dtype)
            incoming = {"keys": key_states, "values": value_states}
        for name, t in incoming.items():
            old = getattr(self, name)
            if isinstance(old, list):  # per-head storage: each head gets its new tokens
                setattr(self, name, [torch.cat([p, t[:, j:j + 1]], dim=-2) for j, p in enumerate(old)])
            else:
                setattr(self, name, t if old is None or not old.numel() else torch.cat([old.to(t.dtype), t], dim=-2))
        new = torch.ones(*key_states.shape[:2], q, dtype=torch.bool, device=self.device)
        self.valid = torch.cat([self.valid, new], dim=-1)
        at = torch.arange(self.seen, self.seen + q, device=self.device)
        self.pos = torch.cat([self.pos, at.expand(*key_states.shape[:2], q)], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(*key_states.shape[:2], q)], dim=-1)
        self.seen += q
        self.fresh = q
        keys, values = self.full_precision()
        self._returned = keys
        self.owner.track()
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
        self.pos = None
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
        self.valid, self.pos = self.valid[..., :-n], self.pos[..., :-n]
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
        self.valid, self.pos = fn(self.valid), fn(self.pos)
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

    @property
    def window(self) -> int | None:
        """This layer's sliding window (its block's, from the spec), None for full attention."""
        windows = self.owner.spec.windows
        return windows[self.budget_idx] if windows else None

    @property
    def holdable(self) -> int:
        """Slots worth holding: all stored ones, a sliding layer's window - 1 at most."""
        return held_tokens(self.window, self.stored)

    def slide(self) -> None:
        """Sliding layer: mark the slots no later query can see invalid (a query at p sees p - window < pos <= p;
        every later query sits at `seen` or after), so that `shrink` drops them first."""
        if self.window and self.is_initialized:
            self.valid &= self.pos > self.seen - self.window

    def kept_lengths(self) -> torch.Tensor:
        """Real tokens kept per (batch row, KV head): [B, H]."""
        return self.valid.sum(-1)

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        parts = [p for name in self._storage_names() for p in _per_head(getattr(self, name))]
        return sum(p.numel() * p.element_size() for p in parts)

    def bookkeeping_bytes(self) -> int:
        n = 0 if self.valid is None else self.valid.numel() + self.pos.numel() * 8
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
        self.valid, self.pos = torch.gather(self.valid, 2, indices), torch.gather(self.pos, 2, indices)
        if self.scores is not None:
            self.scores = torch.gather(self.scores, 2, indices)
        self.heads_uniform = self.keys.shape[1] == 1 or bool((indices == indices[:, :1]).all())
        self._returned = None
        self.owner.track()

    def compact_heads(self, indices: list[torch.Tensor]) -> None:
        """Keep, for each KV head h, its stored positions `indices[h]` [B, K_h] (ascending, counted within the
        head's own slots); heads may keep different counts, then they are stored apart."""
        k, lengths = self.stored, self.head_lengths()
        counts = [int(i.shape[-1]) for i in indices]
        new_k = max(counts)
        valid = self.valid.new_zeros(self.valid.shape[0], len(indices), new_k)
        pos = self.pos.new_zeros(valid.shape)
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
            pos[:, j, new_k - idx.shape[-1]:] = torch.gather(self.pos[:, j, part], 1, idx[:, 0])
            if scores is not None:
                scores[:, j, new_k - idx.shape[-1]:] = torch.gather(self.scores[:, j, part], 1, idx[:, 0])
        self.valid, self.scores, self.pos = valid, scores, pos
        if len(set(counts)) == 1:  # equal again: one tensor per kind
            for name in self._storage_names():
                setattr(self, name, torch.cat(getattr(self, name), dim=1))
        self.heads_uniform = False
        self._returned = None
        self.owner.track()

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
