"""Multiple choice by log-likelihood (lm-eval's acc and acc_norm), each context run once through the cache."""

from __future__ import annotations

import time

import torch

from .. import arch
from ..data import MCItem
from ..errors import UsageError
from ..progress import progress
from .result import Result


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As lm-eval: a trailing space of the context belongs to the continuation; the continuation's
    # tokens are those of the whole string past the context's tokens.
    n = len(context) - len(context.rstrip(" "))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    if whole[: len(ctx)] != ctx:
        return ctx, tokenizer(continuation, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def choice_logliks(model, tokenizer, items: list[MCItem], batch_size: int = 8, label: str = "mc",
                   show_progress: bool = True) -> tuple[list[list[float]], int]:
    """Sum of log-probabilities of each choice's tokens given its context: one list per item.

    Each context runs once: contexts (left-padded) fill a cache, the cache is repeated per choice, and
    the choices run as one continuation batch. RoPE only sees relative positions, so left padding does
    not change the scores. `batch_size` counts continuation rows (items × choices)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = []  # per item: (context ids, [continuation ids per choice])
    for i, it in enumerate(items):
        pairs = [encode_pair(tokenizer, it.context, ch) for ch in it.choices]
        ctx = pairs[0][0]
        if not ctx or any(not cont for _, cont in pairs):
            raise UsageError(f"{label}: item {i} has an empty context or a choice that encodes to no tokens")
        enc.append((ctx, [cont for _, cont in pairs]))
    # batches of items with the same number of choices and similar longest choices: the continuation rows
    # are padded to the batch's longest choice and hold most of the tokens (HellaSwag: 17% fewer tokens
    # computed than batching by context length)
    order = sorted(range(len(items)), key=lambda i: (len(items[i].choices), -max(map(len, enc[i][1])),
                                                     -len(enc[i][0])))
    batches, cur = [], []
    for i in order:
        if cur and (len(items[cur[0]].choices) != len(items[i].choices)
                    or (len(cur) + 1) * len(items[i].choices) > max(batch_size, len(items[i].choices))):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out = [[0.0] * len(it.choices) for it in items]
    tokens = 0
    decoder = arch.decoder(model)
    dev = model.device  # the token ids and masks go where the model is
    for batch in progress(batches, desc=label, disable=not show_progress):
        n = len(items[batch[0]].choices)
        ctxs = [enc[i][0][:-1] for i in batch]  # the last context token starts the continuation pass
        width = max(len(c) for c in ctxs)
        x = torch.full((len(batch), width), pad, dtype=torch.long, device=dev)
        m = torch.zeros((len(batch), width), dtype=torch.long, device=dev)
        for r, c in enumerate(ctxs):
            if c:
                x[r, width - len(c):] = torch.tensor(c, device=dev)
                m[r, width - len(c):] = 1
        cache = arch.new_cache(model)
        if width:
            decoder(input_ids=x, attention_mask=m, cache=cache, use_cache=True)
            cache.batch_repeat_interleave(n)
        rows = [([enc[i][0][-1]] + cont[:-1], cont) for i in batch for cont in enc[i][1]]
        cw = max(len(inp) for inp, _ in rows)
        y = torch.full((len(rows), cw), pad, dtype=torch.long, device=dev)
        my = torch.zeros((len(rows), cw), dtype=torch.long, device=dev)
        for r, (inp, _) in enumerate(rows):
            y[r, : len(inp)] = torch.tensor(inp, device=dev)
            my[r, : len(inp)] = 1
        mask = torch.cat([m.repeat_interleave(n, 0), my], dim=1)
        h = decoder(input_ids=y, attention_mask=mask, cache=cache if width else None, use_cache=bool(width))[0]
        sel = my.bool()
        logp = torch.log_softmax(arch.logits(model, h[sel]), dim=-1)
        targets = torch.tensor([t for _, cont in rows for t in cont], device=logp.device)
        picked = logp[torch.arange(len(targets), device=logp.device), targets]
        owner = torch.arange(len(rows), device=logp.device).repeat_interleave(my.sum(1).to(logp.device))
        sums = torch.zeros(len(rows), device=logp.device).index_add_(0, owner, picked)
        for r, i in enumerate(batch):
            out[i] = sums[r * n : (r + 1) * n].tolist()
        tokens += int(m.sum()) + int(my.sum())
    return out, tokens


def mc_scores(items: list[MCItem], logliks: list[list[float]]) -> dict:
    """acc: highest log-likelihood; acc_norm: highest log-likelihood per character (lm-eval's)."""
    acc = sum(max(range(len(ll)), key=ll.__getitem__) == it.label for it, ll in zip(items, logliks, strict=True))
    acc_norm = sum(
        max(range(len(ll)), key=lambda j: ll[j] / max(1, len(it.choices[j]))) == it.label
        for it, ll in zip(items, logliks, strict=True)
    )
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def multiple_choice(model, tokenizer, items: list[MCItem], batch_size: int = 8, label: str = "mc") -> Result:
    t0 = time.perf_counter()
    logliks, tokens = choice_logliks(model, tokenizer, items, batch_size=batch_size, label=label)
    scores = mc_scores(items, logliks)
    chance = sum(1 / len(it.choices) for it in items) / len(items)
    return Result("mc", "acc", scores["acc"], len(items), {"acc_norm": scores["acc_norm"], "chance": chance},
                  tokens=tokens, seconds=time.perf_counter() - t0)
