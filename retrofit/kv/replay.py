"""Prefill once, compress many ways: a recorded full prefill replayed into budgeted caches.

Compression happens right after each layer's attention, so the prefill's hidden states never depend
on the budget: only what the cache keeps does. `record_prefill` runs the prompt once with a full cache
and keeps each layer's keys, values, padding and last-window queries; `replay(spec, record)` feeds them
layer by layer through the same decisions a live prefill takes (cascading included, so the measured
peak bytes are those of a live run) and returns the compressed cache, ready for continuation or decoding.
Searches and benchmarks use it to score many budgets and policies at the cost of one prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import profile, reach_of, received_attention, register, window_probs
from .cache import BudgetedCache
from .layer import active_layer
from .policies import StreamingLLM
from .spec import KVSpec


@dataclass
class PrefillRecord:
    keys: list  # per layer [B, Hkv, T, D]
    values: list
    valid: list  # per layer [B, 1 or Hkv, T] bool or None
    queries: list  # per layer [B, Hq, w, D]: the last w queries (after RoPE)
    scaling: float
    groups: int
    seen: int
    logits: torch.Tensor | None = None  # last position's logits
    mass: list | None = None  # per layer [B, 2·Hq, T]: attention received from all prompt queries (h2o, mix)
    windows: list | None = None  # per layer: the sliding window its module passed (None: full attention)
    softcap: float | None = None  # attention-logit softcapping (Gemma 2)


@torch.no_grad()
def record_prefill(model, input_ids, attention_mask=None, window: int = 32, mass: bool = True,
                   prefix: int | None = None):
    """Run the prompt once through a full budgeted cache and keep what replays need (`mass`: also the
    attention every key received, for the h2o and mix policies; one more Q·Kᵀ per layer).

    `prefix` = P: also return the record of the first P tokens alone, `(record, prefix_record)`, from the same
    forward (causal attention: their keys, values, last-window queries and the mass their own queries gave are
    what a prefill of those P tokens computes). Benchmarks use it to compress a passkey context both with the
    question (query-aware) and before it (query-agnostic) at the cost of one prefill."""
    register()
    if getattr(model.config, "_attn_implementation", None) != "adaflex_kv":
        raise RuntimeError("record_prefill needs a model with the kv stage applied")
    n = model.config.num_hidden_layers
    if prefix is not None and not 0 < prefix <= input_ids.shape[1]:
        raise ValueError(f"prefix {prefix} outside (0, {input_ids.shape[1]}]")
    cache = BudgetedCache(KVSpec(num_layers=n, policy=StreamingLLM(), budget=1.0))
    queries, masses, meta, windows = [None] * n, [None] * n, {}, [None] * n
    pre_queries, pre_masses = [None] * n, [None] * n

    def watch(i, query, key, valid, scaling, groups, reach=None, softcap=None):
        queries[i] = query[:, :, -min(window, query.shape[2]):].clone()
        windows[i] = None if reach is None else reach.window
        kw = {"reach": reach, "softcap": softcap}
        if prefix is not None:
            pre_queries[i] = query[:, :, max(0, prefix - window):prefix].clone()
        if mass and prefix is not None:
            head, masses[i] = received_attention(query, key, valid, scaling, groups, split=prefix, **kw)
            pre_masses[i] = head[..., :prefix].clone()
        elif mass:
            masses[i] = received_attention(query, key, valid, scaling, groups, **kw)
        meta.update(scaling=scaling, groups=groups, softcap=softcap)

    with profile(watch):
        out = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
    layers = cache.layers
    valid = [None if bool(x.valid.all()) else x.valid for x in layers]
    rec = PrefillRecord([x.keys for x in layers], [x.values for x in layers], valid, queries,
                        meta["scaling"], meta["groups"], layers[0].seen, out.logits[:, -1].float(),
                        masses if mass else None, windows, meta["softcap"])
    if prefix is None:
        return rec
    pre_valid = [None if v is None or bool(v[..., :prefix].all()) else v[..., :prefix] for v in valid]
    pre = PrefillRecord([x.keys[..., :prefix, :] for x in layers], [x.values[..., :prefix, :] for x in layers],
                        pre_valid, pre_queries, meta["scaling"], meta["groups"], prefix, None,
                        pre_masses if mass else None, windows, meta["softcap"])
    return rec, pre


def replay(spec: KVSpec, record: PrefillRecord) -> BudgetedCache:
    """A cache holding what a live prefill with `spec` would have kept."""
    cache = BudgetedCache(spec)
    for i, layer in enumerate(cache.layers):
        k, _ = layer.update(record.keys[i], record.values[i])  # as a live prefill stores them
        active_layer(k)
        if record.valid[i] is not None:
            layer.valid = record.valid[i].expand(k.shape[0], k.shape[1], -1).clone()
        q = record.queries[i]
        w = cache.probe_queries(layer, record.seen)
        valid = None if record.valid[i] is None else record.valid[i][:, :1]
        reach = reach_of(record.windows and record.windows[i], layer, q.shape[2], k.shape[2], k.shape[0], k.device)
        probs = (window_probs(q, k, valid, record.scaling, min(w, q.shape[2]), record.groups, reach, record.softcap)
                 if w else None)
        mass = None
        if cache.wants_mass(layer):
            if record.mass is None:
                raise ValueError(f"policy {spec.policy.name} needs a record made with mass=True")
            mass = record.mass[i]
        cache.after_attention(layer, probs, record.groups, mass)
    return cache
