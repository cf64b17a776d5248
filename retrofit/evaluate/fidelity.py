"""`task: fidelity`: how closely the retrofitted model follows the dense one, on text of the dense model's own (held
out `generated:test`, or any text source).

Each window's first half is prefilled through the model's cache (so KV budgets and prefill routes apply), and the
second half is scored:
- KL(dense || retrofitted) over the dense model's top-k tokens (k=128) plus one tail bin holding the rest of the
  probability mass on both sides (a lower bound of the full KL that needs only the dense top-k kept);
- top-1 agreement: the retrofitted model's likeliest token is the dense model's;
- perplexity of the scored tokens (for generated text: the dense model's own continuations).
The dense top-k comes from the dense model before any stage, kept in the run's state dir (`reference`), so a
resumed run scores the retrofitted model without the dense one. Without a kept reference the model is compared
with itself (KL 0, agreement 1): that is the dense row of a report.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import torch

from .. import arch, io
from ..errors import UsageError
from ..progress import progress
from .result import Result

TOP_K = 128


def windows(source, tokenizer, seq_len: int, limit: int | None) -> list[tuple[torch.Tensor, int]]:
    """(token ids, first scored position) per window. Generated rows: the prompt and the first half of the
    continuation are the context. Other text: consecutive windows of `seq_len`, the second half scored."""
    if source.ids is not None:
        out = [(row, s + (len(row) - s) // 2) for row, s in zip(source.ids, source.starts, strict=True)]
    else:
        ids = tokenizer(source.text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
        out = [(ids[s : s + seq_len], seq_len // 2) for s in range(0, ids.numel() - seq_len + 1, seq_len)]
    out = [(row, c) for row, c in out if 1 <= c < len(row)]
    if not out:
        raise UsageError(f"{source.spec.raw}: no window of {seq_len} tokens to score fidelity on")
    return out[:limit] if limit else out


def _logits(model, x: torch.Tensor, c: int) -> torch.Tensor:
    """Log-probabilities predicting x[:, c:] after prefilling x[:, :c] through the model's cache [B, T, V]."""
    x = x.to(model.device)  # windows are tokenized on the CPU
    pre = model(input_ids=x[:, :c], cache=arch.new_cache(model), use_cache=True, logits_to_keep=1)
    out = model(input_ids=x[:, c:], cache=pre.cache, use_cache=True)
    logits = torch.cat([pre.logits[:, -1:], out.logits[:, :-1]], dim=1).float()
    return torch.log_softmax(logits, dim=-1)


def _digest(wins) -> str:
    h = hashlib.sha256()
    for row, c in wins:
        h.update(row.numpy().astype("int64").tobytes() + str(c).encode())
    return h.hexdigest()[:16]


def kl_top1(ref_logp: torch.Tensor, ref_idx: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(p || q) over the top-k bins of p plus one tail bin, and whether q's argmax is p's top-1."""
    q_top = logp.gather(-1, ref_idx.long())
    p = ref_logp.exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (ref_logp - q_top)).sum(-1)
    kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()), torch.zeros_like(kl))
    return kl.clamp_min(0), logp.argmax(-1) == ref_idx[..., 0].long()


@torch.no_grad()
def fidelity(model, tokenizer, source, *, seq_len: int = 512, limit: int | None = None, batch_size: int = 4,
             reference: Path | None = None, label: str = "fidelity"):
    wins = windows(source, tokenizer, seq_len, limit)
    digest = _digest(wins)
    kept = None
    if reference is not None and Path(reference).is_file():
        from safetensors import safe_open

        with safe_open(str(reference), "pt") as f:
            if f.metadata().get("windows") != digest:
                raise UsageError(f"{reference}: the dense reference was kept for other text; rerun with another --out")
            kept = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    new_ref = {}
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (row, c) in enumerate(wins):
        groups.setdefault((len(row), c), []).append(i)
    batches = [(key, idx[s : s + batch_size]) for key, idx in groups.items() for s in range(0, len(idx), batch_size)]
    nll = kl_sum = agree = 0.0
    count, t0 = 0, time.perf_counter()
    for (_, c), idx in progress(batches, desc=label):
        x = torch.stack([wins[i][0] for i in idx])
        logp = _logits(model, x, c)
        targets = x[:, c:].to(logp.device)
        nll -= float(logp.gather(-1, targets[..., None]).sum())
        for r, i in enumerate(idx):
            if kept is not None:
                ref_logp, ref_idx = kept[f"logp.{i}"].to(logp.device).float(), kept[f"idx.{i}"].to(logp.device)
            else:
                ref_logp, ref_idx = logp[r].topk(min(TOP_K, logp.shape[-1]), dim=-1)
                new_ref[f"logp.{i}"], new_ref[f"idx.{i}"] = ref_logp.cpu(), ref_idx.to("cpu", torch.int32)
            kl, top1 = kl_top1(ref_logp, ref_idx, logp[r])
            kl_sum, agree = kl_sum + float(kl.sum()), agree + float(top1.sum())
        count += targets.numel()
    if kept is None and reference is not None:
        io.save_tensors(reference, new_ref, {"windows": digest, "top_k": str(TOP_K)})
    return Result("fidelity", "perplexity", math.exp(nll / count), len(wins),
                  {"kl": kl_sum / count, "top1_agreement": agree / count, "scored_tokens": count, "top_k": TOP_K,
                   "reference": "dense" if kept is not None else "self"},
                  tokens=sum(len(wins[i][0]) for _, idx in batches for i in idx), seconds=time.perf_counter() - t0)
