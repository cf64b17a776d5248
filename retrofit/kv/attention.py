"""The attention function of budgeted caches, registered with transformers' `AttentionInterface`.

transformers 5.x builds one causal mask for all full-attention layers, sized from the first layer's
cache; with layers that keep different numbers of tokens that mask is wrong for every other layer.
Here the mask interface only passes on the padding of the keys (a [B, kv] bool, or None), and the
attention function builds each layer's own lower-right-aligned causal mask from its key length:
query i of q sees key j of K iff j <= K - q + i, and only keys that are real tokens (the cache's
`valid` for a budgeted layer, the padding mask otherwise).

Decode steps (one query) take `kernels.decode_attention` when the dispatcher picks Triton (CUDA, or CPU
under TRITON_INTERPRET=1): each (row, KV head) attends to one run of slots [start, start + length), which
is what left padding and eviction leave (left padding sits before the real tokens, eviction drops padding
first and keeps slot order, new tokens are appended); any other layout (right padding) takes SDPA.

Sliding layers (the module passes `sliding_window`, as to transformers' own functions): a query at position p sees
only keys at positions > p - window; positions are the slots' indices in the sequence seen (`BudgetedLayer.pos`,
which eviction gathers with the keys), as transformers' sliding masks count them. Attention-logit softcapping
(`softcap`, Gemma 2: cap·tanh(logits / cap) before the mask and softmax) takes an eager path, which SDPA and the
decode kernel cannot do. The module's `scaling` (Gemma's `query_pre_attn_scalar`) is used as given.

After the output is computed, a budgeted layer hands the attention of its last queries to its cache,
which scores, allocates and evicts (cache.py). Profilers (offline plans) can watch every layer.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from adaflex.kernels import backend, decode_attention

from .layer import active_layer

NAME = "adaflex_kv"
_PROFILE = threading.local()


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def lower_right_causal(q: int, k: int, device) -> torch.Tensor:
    """[q, k] bool: query i sees key j iff j <= k - q + i."""
    i = torch.arange(q, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    return j <= (k - q + i)


def build_mask(q: int, k: int, key_valid: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean attention mask [B, H or 1, q, k] (None: plain causal with q == k, or q == 1 unpadded).

    key_valid: [B, H, k] or [B, 1, k] bool, or None when every key is a real token. A query always sees
    its own key, so padded query rows stay finite (their outputs are never used)."""
    if key_valid is None:
        if q == 1 or q == k:
            return None
        return lower_right_causal(q, k, device)[None, None]
    mask = lower_right_causal(q, k, device)[None, None] & key_valid[:, :, None, :]
    diag = torch.arange(q, device=device)
    mask[:, :, diag, k - q + diag] = True
    return mask


def decode_span(valid: torch.Tensor | None, batch: int, kv_heads: int, k: int, device):
    """(lengths, starts) [B, Hkv] of the keys one decode query sees (build_mask's rule for q == 1), or None
    when those keys are not one run per (row, KV head) ending at the query's own key.

    valid: as build_mask's key_valid, [B, 1 or Hkv, k] bool or None (every key real)."""
    if valid is None:
        return (torch.full((batch, kv_heads), k, dtype=torch.long, device=device),
                torch.zeros(batch, kv_heads, dtype=torch.long, device=device))
    seen = valid.clone()
    seen[..., -1] = True  # a query always sees its own key
    lengths = seen.sum(-1)
    starts = k - lengths
    if not bool((seen == (torch.arange(k, device=seen.device) >= starts[..., None])).all()):
        return None
    return lengths.expand(batch, kv_heads), starts.expand(batch, kv_heads)


class Reach:
    """What a sliding layer's queries see: key at `kpos` [B, 1 or Hkv, K] is visible to the query at `qpos` [q]
    iff kpos > qpos - window (causality is the lower-right mask's)."""

    def __init__(self, window: int, kpos: torch.Tensor, qpos: torch.Tensor):
        self.window, self.kpos, self.qpos = window, kpos, qpos

    def near(self, start: int = 0, stop: int | None = None, keys: int | None = None) -> torch.Tensor:
        """[B, 1 or Hkv, n, keys] bool for queries start:stop over the first `keys` keys."""
        return self.kpos[:, :, None, :keys] > (self.qpos[start:stop] - self.window)[None, None, :, None]


def reach_of(window, layer, q: int, k: int, batch: int, device) -> Reach | None:
    """The Reach of a sliding layer's attention call (None: full attention). Without a budgeted layer the keys
    are the last k positions of the sequence (a plain or no cache), the queries its last q."""
    if not window:
        return None
    if layer is None:
        return Reach(window, torch.arange(k, device=device).expand(batch, 1, k), torch.arange(k - q, k, device=device))
    kpos = layer.pos if not layer.heads_uniform else layer.pos[:, :1]
    return Reach(window, kpos.to(device), torch.arange(layer.seen - q, layer.seen, device=device))


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if not cap else torch.tanh(logits / cap) * cap


def window_probs(query, key, key_valid, scaling: float, w: int, groups: int, reach: Reach | None = None,
                 softcap: float | None = None) -> torch.Tensor:
    """Softmax attention [B, Hq, w, K] of the last w queries over all keys (same masking)."""
    q, k = query.shape[2], key.shape[2]
    qw = query[:, :, q - w:].float()
    logits = _softcap(torch.matmul(qw, _repeat_heads(key.float(), groups).transpose(2, 3)) * scaling, softcap)
    causal = lower_right_causal(w, k, query.device)[None, None]
    mask = causal if key_valid is None else causal & key_valid[:, :, None, :]
    if reach is not None:
        mask = mask & reach.near(q - w)
    if mask.shape[1] > 1:
        mask = _repeat_heads(mask, groups)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def received_attention(query, key, key_valid, scaling: float, groups: int, chunk: int = 256,
                       split: int | None = None, reach: Reach | None = None, softcap: float | None = None):
    """Attention each key received, per query head: [B, 2·Hq, K], the sum over the queries of p (first Hq rows)
    then of p² (last Hq rows; peaks weigh more, see the `h2o` policy's `stat`).

    Same masking as the attention itself. Queries go `chunk` at a time and each chunk only multiplies the keys
    its last query can see (causal: about half the work of a full Q·Kᵀ); the query heads of a GQA group share
    their KV head's keys without copying them. `split` (a prompt, q == K): also return what the first `split`
    queries gave, i.e. what a prefill of only those tokens would have summed: (that, all)."""
    b, hq, q, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    kt = key.float().transpose(2, 3)  # [B, Hkv, D, K]
    total = query.new_zeros(b, 2, hkv, groups, k, dtype=torch.float32)
    head = None
    bounds = sorted({*range(0, q, chunk), *([split] if split is not None and 0 <= split < q else [])}) + [q]
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if s == split:
            head = total.clone()
        n, kl = e - s, e + (k - q)  # kl: keys the chunk's last query sees (lower-right alignment)
        qc = query[:, :, s:e].float().reshape(b, hkv, groups * n, d)  # query heads h = kv * groups + j
        logits = _softcap(torch.matmul(qc, kt[..., :kl]) * scaling, softcap)  # [B, Hkv, groups * n, kl]
        i = torch.arange(s, e, device=query.device)[:, None] + (k - q)
        mask = (torch.arange(kl, device=query.device)[None, :] <= i).repeat(groups, 1)
        if key_valid is not None:
            mask = mask & key_valid[:, :, None, :kl]
        if reach is not None:  # rows are (group, query): the window repeats per group
            mask = mask & reach.near(s, e, kl).repeat(1, 1, groups, 1)
        probs = torch.softmax(logits.masked_fill_(~mask, float("-inf")), dim=-1)
        if key_valid is not None or reach is not None:  # a query row with no visible key (padding) gives NaN
            probs = probs.nan_to_num_(0.0)
        probs = probs.view(b, hkv, groups, n, kl)
        total[:, 0, ..., :kl] += probs.sum(dim=3)
        total[:, 1, ..., :kl] += probs.square_().sum(dim=3)
    if split is not None and head is None:  # split >= q: the first `split` queries are all of them
        head = total.clone()
    total = total.reshape(b, 2 * hq, k)
    return total if split is None else (head.reshape(b, 2 * hq, k), total)


def received_mass(query, key, key_valid, scaling: float, groups: int, chunk: int = 256, **kw) -> torch.Tensor:
    """Attention each key received, summed over all queries and averaged over a GQA group: [B, Hkv, K]."""
    b, hq = query.shape[:2]
    s = received_attention(query, key, key_valid, scaling, groups, chunk, **kw)[:, :hq]
    return s.reshape(b, hq // groups, groups, -1).mean(dim=2)


def eager_attention(query, key, value, mask, scaling: float, groups: int, softcap: float | None, dropout: float,
                    training: bool) -> torch.Tensor:
    """transformers' eager attention (softcapping included) under a boolean mask [B, H, q, K] or None (causal):
    [B, q, Hq, D]."""
    q, k = query.shape[2], key.shape[2]
    logits = _softcap(torch.matmul(query, _repeat_heads(key, groups).transpose(2, 3)) * scaling, softcap)
    if mask is None and q > 1:
        mask = lower_right_causal(q, k, query.device)[None, None]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, _repeat_heads(value, groups)).transpose(1, 2)


def adaflex_kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         sliding_window=None, softcap=None, **kwargs):
    """query [B, Hq, q, D], key/value [B, Hkv, K, D]; attention_mask: key padding [B, kv] bool or None;
    sliding_window, softcap: as the module passes them to transformers' attention functions."""
    q, k = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    scaling = module.scaling if scaling is None else scaling
    layer = active_layer(key)
    pad = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    if layer is not None:
        if pad is not None:  # the new tokens' padding, the last q columns
            new = pad[:, -q:].to(layer.valid.device)
            layer.valid[:, :, -q:] = new[:, None, :]
        valid = layer.valid if not layer.heads_uniform else layer.valid[:, :1]
        if bool(valid.all()):
            valid = None
    elif pad is not None:
        kv = pad[:, -k:] if pad.shape[-1] >= k else F.pad(pad, (k - pad.shape[-1], 0), value=True)
        valid = None if bool(kv.all()) else kv[:, None, :]
    else:
        valid = None
    reach = reach_of(sliding_window, layer, q, k, key.shape[0], key.device)
    if reach is not None and q == 1:  # one query: the window is a key mask
        near = reach.near()[:, :, 0]
        valid = near if valid is None else valid & near
        valid, reach = None if bool(valid.all()) else valid, None
    span = None
    if q == 1 and not dropout and not softcap and backend(query, key, value) == "triton":
        span = decode_span(valid, key.shape[0], key.shape[1], k, key.device)
    if span is not None:  # split-KV decode over each (row, KV head)'s kept run of keys: [B, 1, Hq, D]
        out = decode_attention(query[:, :, 0], key, value, span[0], scaling, starts=span[1])[:, None]
    else:
        mask = build_mask(q, k, valid, query.device)
        if reach is not None:
            mask = (lower_right_causal(q, k, query.device)[None, None] if mask is None else mask) & reach.near()
            diag = torch.arange(q, device=mask.device)
            mask[..., diag, k - q + diag] = True  # its own key: padded rows stay finite
        if mask is not None and mask.shape[1] > 1:
            mask = _repeat_heads(mask, groups)
        if softcap:
            out = eager_attention(query, key, value, mask, scaling, groups, softcap, dropout, module.training)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                 scale=scaling, is_causal=mask is None and q > 1,
                                                 enable_gqa=groups > 1)
            out = out.transpose(1, 2)
    prof = getattr(_PROFILE, "fn", None)
    if prof is not None:
        prof(module.layer_idx, query, key, valid, scaling, groups, reach=reach, softcap=softcap)
    if layer is not None:
        owner = layer.owner
        w = owner.probe_queries(layer, q)
        probs = window_probs(query, key, valid, scaling, w, groups, reach, softcap) if w else None
        mass = (received_attention(query, key, valid, scaling, groups, reach=reach, softcap=softcap)
                if owner.wants_mass(layer) else None)
        owner.after_attention(layer, probs, groups, mass)
    return out.contiguous(), None


def adaflex_kv_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, **kwargs):
    """The 'mask' every layer receives: the keys' padding as [B, kv] bool, or None when nothing is padded."""
    if attention_mask is None:
        return None
    m = attention_mask.to(torch.bool)
    if m.dim() != 2:
        return m
    if bool(m.all()):
        return None
    return m


@contextmanager
def profile(fn):
    """Call fn(layer_idx, query, key, key_valid, scaling, groups, reach=, softcap=) in every adaflex attention
    call (reach: the sliding layer's `Reach` or None)."""
    old = getattr(_PROFILE, "fn", None)
    _PROFILE.fn = fn
    try:
        yield
    finally:
        _PROFILE.fn = old


_registered = False


def register() -> str:
    """Register the attention and mask functions once; returns the implementation name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, adaflex_kv_attention)
        AttentionMaskInterface.register(NAME, adaflex_kv_mask)
        _registered = True
    return NAME
