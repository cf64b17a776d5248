"""Perplexity: strided windows, or context → continuation through the model's cache (so KV eviction and routes
apply). The head runs only on the scored positions (for SmolLM2 it costs as much as the decoder stack)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .. import arch
from ..errors import UsageError
from ..progress import progress
from .result import Result


def _nll(logits, targets) -> tuple[float, int]:
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll.item(), targets.numel()


@torch.no_grad()
def perplexity(model, tokenizer, text: str, seq_len: int = 512, stride: int | None = None, batch_size: int = 4,
               limit: int | None = None, label: str = "perplexity") -> Result:
    """Strided perplexity: windows of `seq_len`; with stride < seq_len only the new tokens are scored."""
    stride = stride or seq_len
    if stride > seq_len:
        raise UsageError(f"stride {stride} is larger than seq_len {seq_len}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0].to(model.device)
    if ids.numel() < seq_len + 1:
        raise UsageError(f"{label}: only {ids.numel()} tokens, fewer than a {seq_len}-token window")
    # (start, first scored position inside the window)
    windows = [(0, 1)] + [(s, max(1, seq_len - stride)) for s in range(stride, ids.numel() - seq_len + 1, stride)]
    if limit:
        windows = windows[:limit]
    total, count, t0 = 0.0, 0, time.perf_counter()
    for i in progress(range(0, len(windows), batch_size), desc=label, total=math.ceil(len(windows) / batch_size)):
        chunk = windows[i : i + batch_size]
        x = torch.stack([ids[s : s + seq_len] for s, _ in chunk])
        h = arch.hidden_states(model, x)
        for row, (_, first) in enumerate(chunk):
            logits = arch.logits(model, h[row, first - 1 : -1])
            nll, n = _nll(logits, x[row, first:])
            total, count = total + nll, count + n
    seconds = time.perf_counter() - t0
    return Result("perplexity", "perplexity", math.exp(total / count), len(windows),
                  {"nll": total / count, "scored_tokens": count, "seq_len": seq_len, "stride": stride},
                  tokens=len(windows) * seq_len, seconds=seconds)


@torch.no_grad()
def continuation_nll(model, x: torch.Tensor, context: int) -> tuple[float, int]:
    """Summed NLL and count of the tokens x[:, context:] [B, T] (on the model's device), after prefilling
    x[:, :context] through the model's own cache."""
    pre = model(input_ids=x[:, :context], cache=arch.new_cache(model), use_cache=True, logits_to_keep=1)
    out = model(input_ids=x[:, context:], cache=pre.cache, use_cache=True)
    return _nll(torch.cat([pre.logits[:, -1:], out.logits[:, :-1]], dim=1).float(), x[:, context:])


@torch.no_grad()
def continuation_perplexity(model, tokenizer, text: str, context: int, continuation: int, batch_size: int = 4,
                            limit: int | None = None, label: str = "perplexity") -> Result:
    """Prefill `context` tokens through the model's cache (so KV eviction applies), then score the next
    `continuation` tokens, window after window of context + continuation tokens."""
    span = context + continuation
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0].to(model.device)
    starts = list(range(0, ids.numel() - span + 1, span))
    if not starts:
        raise UsageError(f"{label}: only {ids.numel()} tokens, fewer than context + continuation = {span}")
    if limit:
        starts = starts[:limit]
    total, count, t0 = 0.0, 0, time.perf_counter()
    for i in progress(range(0, len(starts), batch_size), desc=label, total=math.ceil(len(starts) / batch_size)):
        nll, n = continuation_nll(model, torch.stack([ids[s : s + span] for s in starts[i : i + batch_size]]), context)
        total, count = total + nll, count + n
    seconds = time.perf_counter() - t0
    return Result("perplexity", "perplexity", math.exp(total / count), len(starts),
                  {"nll": total / count, "scored_tokens": count, "context": context, "continuation": continuation},
                  tokens=len(starts) * span, seconds=seconds)
