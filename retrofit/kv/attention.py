"""The attention function of budgeted caches, registered with transformers' `AttentionInterface`.

transformers 5.x builds one causal mask for all full-attention layers, sized from the first layer's
cache; with layers that keep different numbers of tokens that mask is wrong for every other layer.
Here the mask interface only passes on the padding of the keys (a [B, kv] bool, or None), and the
attention function builds each layer's own lower-right-aligned causal mask from its key length:
query i of q sees key j of K iff j <= K - q + i, and only keys that are real tokens (the cache's
`valid` for a budgeted layer, the padding mask otherwise).

After the output is computed, a budgeted layer hands the attention of its last queries to its cache,
which scores, allocates and evicts (cache.py). Profilers (offline plans) can watch every layer.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .cache import active_layer

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


def window_probs(query, key, key_valid, scaling: float, w: int, groups: int) -> torch.Tensor:
    """Softmax attention [B, Hq, w, K] of the last w queries over all keys (same masking)."""
    q, k = query.shape[2], key.shape[2]
    qw = query[:, :, q - w:].float()
    logits = torch.matmul(qw, _repeat_heads(key.float(), groups).transpose(2, 3)) * scaling
    causal = lower_right_causal(w, k, query.device)[None, None]
    if key_valid is not None and key_valid.shape[1] > 1:
        key_valid = _repeat_heads(key_valid, groups)
    mask = causal if key_valid is None else causal & key_valid[:, :, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def received_mass(query, key, key_valid, scaling: float, groups: int, chunk: int = 256) -> torch.Tensor:
    """Attention each key received, summed over all queries and averaged over a GQA group: [B, Hkv, K].

    Same masking as the attention itself; queries go `chunk` at a time so memory stays [B, Hq, chunk, K]."""
    q, k = query.shape[2], key.shape[2]
    kk = _repeat_heads(key.float(), groups).transpose(2, 3)
    if key_valid is not None and key_valid.shape[1] > 1:
        key_valid = _repeat_heads(key_valid, groups)
    total = query.new_zeros(query.shape[0], query.shape[1], k, dtype=torch.float32)
    for s in range(0, q, chunk):
        e = min(q, s + chunk)
        logits = torch.matmul(query[:, :, s:e].float(), kk) * scaling
        i = torch.arange(s, e, device=query.device)[:, None]
        mask = (torch.arange(k, device=query.device)[None, :] <= i + (k - q))[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, :, None, :]
        total += torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0).sum(dim=2)
    if groups == 1:
        return total
    b, hq = total.shape[:2]
    return total.reshape(b, hq // groups, groups, k).mean(dim=2)


def adaflex_kv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         **kwargs):
    """query [B, Hq, q, D], key/value [B, Hkv, K, D]; attention_mask: key padding [B, kv] bool or None."""
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
    mask = build_mask(q, k, valid, query.device)
    if mask is not None and mask.shape[1] > 1:
        mask = _repeat_heads(mask, groups)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=mask is None and q > 1, enable_gqa=groups > 1)
    prof = getattr(_PROFILE, "fn", None)
    if prof is not None:
        prof(module.layer_idx, query, key, valid, scaling, groups)
    if layer is not None:
        owner = layer.owner
        w = owner.probe_queries(layer, q)
        probs = window_probs(query, key, valid, scaling, w, groups) if w else None
        mass = received_mass(query, key, valid, scaling, groups) if owner.wants_mass(layer) else None
        owner.after_attention(layer, probs, groups, mass)
    return out.transpose(1, 2).contiguous(), None


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
    """Call fn(layer_idx, query, key, key_valid, scaling, groups) in every adaflex attention call."""
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
