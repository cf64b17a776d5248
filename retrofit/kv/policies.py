"""Selection policies: small press-like objects that score the stored tokens of one layer.

A policy turns the attention of the observation window (the last `window` queries of the prompt) into
one score per stored key and KV head; the cache keeps the sinks and the recent window whatever the
score, and the top-scored tokens for the rest of the layer's budget. Scores are pooled along the key
axis (`kernel`) so a selected token brings its neighbours: SmolLM2 spells a number digit by digit,
and keeping only the peak digit loses the rest of the span (methods.md, "KV budgets").

    streaming   StreamingLLM: recency only (sinks + the most recent tokens); needs no attention
    snapkv      SnapKV: mean attention of the window queries, avg-pooled, averaged over a GQA group
    cake        CAKE's indicator: mean + gamma * variance of the window attention, pooled, GQA-averaged
    h2o         heavy hitters (H2O at prefill): mean attention each key received from *every* prompt query,
                not pooled (single tokens; pooling measured worse for continuation perplexity)
    mix         max(snapkv's pooled window score, h2o's score): spans around what the last queries (a
                question) look at, for retrieval, and the prompt's heavy hitters, for continuation

During decoding (fixed size) every attention-scored policy keeps a running mean of the attention each
stored token receives (CAKE decodes with the mean only); StreamingLLM stays purely positional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Centred average pooling along the last axis (odd kernel, edges averaged over what exists)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    out = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return out.reshape(shape)


def group_mean(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...]: average the query heads that share a KV head."""
    if groups == 1:
        return x
    b, hq = x.shape[:2]
    return x.reshape(b, hq // groups, groups, *x.shape[2:]).mean(dim=2)


@dataclass
class Policy:
    """Base: scores [B, Hkv, K] from window probabilities [B, Hq, w, K] (rows sum to 1 over valid keys)."""

    kernel: int = 7
    name: str = "base"
    needs_attention: bool = True
    needs_mass: bool = False  # wants the attention received from every prompt query (`mass`)
    needs_values: bool = False  # wants the layer's stored values (`values`)

    def score(self, probs: torch.Tensor | None, groups: int, length: int, mass=None, values=None) -> torch.Tensor:
        """mass: [B, 2·Hq, K] per query head, the mean over all prompt queries of the attention p each key
        received, then of p² (needs_mass only); values: [B, Hkv, K, D] (needs_values only)."""
        raise NotImplementedError

    def running(self, probs: torch.Tensor, groups: int) -> torch.Tensor:
        """Per-key attention received from new queries [B, Hkv, K] (decoding updates)."""
        return group_mean(probs.mean(dim=2), groups)


@dataclass
class StreamingLLM(Policy):
    name: str = "streaming"
    needs_attention: bool = False

    def score(self, probs, groups, length, mass=None, values=None):
        # the stored order is chronological: later is better
        return torch.arange(length, dtype=torch.float32)


@dataclass
class SnapKV(Policy):
    name: str = "snapkv"

    def score(self, probs, groups, length, mass=None, values=None):
        return group_mean(pool(probs.mean(dim=2), self.kernel), groups)


@dataclass
class CakeIndicator(Policy):
    name: str = "cake"
    gamma: float = 200.0

    def score(self, probs, groups, length, mass=None, values=None):
        mean = probs.mean(dim=2)
        var = probs.var(dim=2, unbiased=False) if probs.shape[2] > 1 else torch.zeros_like(mean)
        return group_mean(pool(mean + self.gamma * var, self.kernel), groups)


def received(mass: torch.Tensor, groups: int, stat: str = "mean", heads: str = "mean") -> torch.Tensor:
    """[B, 2·Hq, K] per-query-head means of p and p² over the prompt queries -> one score per KV head [B, Hkv, K].

    stat: `mean` (H2O: the mean attention a key received) or `rms` (root mean square: a key a few queries
    attended strongly outranks one many queries attended a little); heads: `mean` or `max` over the query
    heads that share the KV head (max: a key one head relies on is kept even if its group-mates ignore it)."""
    hq = mass.shape[1] // 2
    x = mass[:, :hq] if stat == "mean" else mass[:, hq:].clamp_min(0).sqrt()
    if groups == 1:
        return x
    x = x.reshape(x.shape[0], hq // groups, groups, x.shape[-1])
    return x.mean(dim=2) if heads == "mean" else x.amax(dim=2)


def value_weight(values: torch.Tensor) -> torch.Tensor:
    """||v|| of each stored value relative to its (row, KV head) mean [B, Hkv, K]: what a key brings to the
    output is its attention times its value, so a key with a small value matters less (scale kept ~1)."""
    n = values.float().norm(dim=-1)
    return n / n.mean(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class H2O(Policy):
    name: str = "h2o"
    needs_mass: bool = True
    stat: str = "mean"  # see `received`
    heads: str = "mean"

    def score(self, probs, groups, length, mass=None, values=None):
        s = received(mass, groups, self.stat, self.heads)
        return s * value_weight(values) if self.needs_values else s


@dataclass
class Mix(H2O):
    name: str = "mix"

    def score(self, probs, groups, length, mass=None, values=None):
        # both are attention shares over the same keys (rows sum to ~1), so their max is comparable
        heavy = super().score(probs, groups, length, mass, values)
        return torch.maximum(group_mean(pool(probs.mean(dim=2), self.kernel), groups), heavy)


def make_policy(name: str, kernel: int = 7, gamma: float = 200.0, stat: str = "mean", heads: str = "mean",
                values: bool = False) -> Policy:
    """stat, heads, values: how `h2o` and `mix` score the attention every prompt query gave (see `received`,
    `value_weight`); the other policies ignore them."""
    if name == "streaming":
        return StreamingLLM(kernel=kernel)
    if name == "snapkv":
        return SnapKV(kernel=kernel)
    if name == "cake":
        return CakeIndicator(kernel=kernel, gamma=gamma)
    if name == "h2o":
        return H2O(kernel=kernel, stat=stat, heads=heads, needs_values=values)
    if name == "mix":
        return Mix(kernel=kernel, stat=stat, heads=heads, needs_values=values)
    raise ValueError(f"policy: unknown '{name}' (streaming, snapkv, cake, h2o, mix)")


def layer_preference(probs: torch.Tensor, window: int) -> tuple[float, float]:
    """CAKE's layer statistics from the window attention: (entropy H, variance V).

    A is the window attention restricted to the keys before the window and renormalised; H sums the
    entropy of each window query's row, V sums over keys the variance across window queries; both are
    averaged over batch rows and heads."""
    k = probs.shape[-1]
    pre = probs[..., : max(1, k - window)].float()
    a = pre / pre.sum(-1, keepdim=True).clamp_min(1e-30)
    # float32 elementwise, float64 sums (5x faster than all in float64; same figures to ~1e-9)
    h = -torch.special.xlogy(a, a).sum((-1, -2), dtype=torch.float64)  # [B, Hq]
    w = a.shape[2]
    if w > 1:  # variance over the window queries, E[a^2] - E[a]^2
        v = (a.square().sum(2, dtype=torch.float64) / w - a.sum(2, dtype=torch.float64).div(w).square())
        v = v.clamp_min(0).sum(-1)
    else:
        v = torch.zeros_like(h)
    return float(h.mean()), float(v.mean())
