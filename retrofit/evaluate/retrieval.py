"""The passkey task: retrieval through the model's cache (so KV eviction applies).

A 5-digit number is planted at a relative depth of a filler context cut from the `--data` text; the
prompt ends with the question, and the model must reproduce the number greedily. `value` is the share
of trials whose answer starts with the number.

- default (query-aware, the `generate()` case): the question is part of the prompt, so the compression
  that follows the prefill sees it;
- `query_agnostic`: the context is prefilled (and compressed) first, the cache is then frozen (append
  only) and the question and answer follow, as kvpress evaluates.
"""

from __future__ import annotations

import random
import re
import time

import torch

from .. import arch
from ..errors import UsageError
from ..progress import progress
from ..state import state_of
from .result import Result

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def parse_depths(spec: str | list | tuple | None) -> list[float]:
    if spec is None:
        return [0.1, 0.5, 0.9]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        depths = [float(x) for x in items if str(x).strip()]
    except ValueError:
        raise UsageError(f"--depths {spec}: expected comma-separated fractions such as 0.1,0.5,0.9") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise UsageError(f"--depths {spec}: every depth must lie in [0, 1]")
    return depths


def build_prompt(tokenizer, filler_ids: list[int], context: int, depth: float, key: str):
    """(context ids, question ids): exactly `context` tokens in total, the needle at `depth` of the filler."""
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    intro, needle, question = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION)
    n_fill = context - len(intro) - len(needle) - len(question)
    if n_fill < 16:
        raise UsageError(f"passkey: --context {context} is too short for the prompt (needs > "
                         f"{context - n_fill + 16} tokens)")
    if len(filler_ids) < n_fill:
        filler_ids = (filler_ids * (n_fill // max(1, len(filler_ids)) + 1))
    fill = filler_ids[:n_fill]
    at = int(round(depth * n_fill))
    return intro + fill[:at] + needle + fill[at:], question


@torch.no_grad()
def greedy(model, cache, ids: torch.Tensor, steps: int) -> torch.Tensor:
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    toks = []
    for s in range(steps):
        nxt = out.logits[:, -1].argmax(-1)
        toks.append(nxt)
        if s + 1 < steps:
            out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)
    return torch.stack(toks, dim=1)


@torch.no_grad()
def passkey(model, tokenizer, text: str, context: int, depths=None, limit: int | None = None,
            query_agnostic: bool | None = None, batch_size: int = 2, seed: int = 0,
            label: str = "passkey") -> Result:
    depths = parse_depths(depths)
    if query_agnostic is None:
        spec = state_of(model).kv
        query_agnostic = bool(spec is not None and spec.extra.get("query_agnostic"))
    trials = limit or 10
    ids = tokenizer(text[: 8 * (context + 64) * (trials + 1)], add_special_tokens=False).input_ids
    rng = random.Random(seed)
    cases = []
    for t in range(trials):
        key = str(rng.randint(10000, 99999))
        depth = depths[t % len(depths)]
        start = rng.randint(0, max(0, len(ids) - context))
        ctx, q = build_prompt(tokenizer, ids[start:start + context], context, depth, key)
        cases.append((depth, key, ctx, q))
    steps = len(tokenizer(" 12345", add_special_tokens=False).input_ids) + 1
    hits = {d: [0, 0] for d in depths}
    t0, tokens = time.perf_counter(), 0
    for i in progress(range(0, trials, batch_size), desc=label, total=-(-trials // batch_size)):
        chunk = cases[i:i + batch_size]
        dev = model.device  # the prompts go where the model is
        ctx = torch.tensor([c[2] for c in chunk], device=dev)
        q = torch.tensor([c[3] for c in chunk], device=dev)
        cache = arch.new_cache(model)
        if query_agnostic:
            model(input_ids=ctx, cache=cache, use_cache=True, logits_to_keep=1)
            if hasattr(cache, "frozen"):
                cache.frozen = True
            gen = greedy(model, cache, q, steps)
        else:
            gen = greedy(model, cache, torch.cat([ctx, q], dim=1), steps)
        for (depth, key, _, _), row in zip(chunk, gen, strict=True):
            answer = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            m = re.search(r"\d+", answer)
            hits[depth][0] += int(m is not None and m.group(0).startswith(key))
            hits[depth][1] += 1
        tokens += ctx.numel() + q.numel() + gen.numel()
    value = sum(h for h, _ in hits.values()) / trials
    return Result("passkey", "accuracy", value, trials,
                  {"context": context, "query_agnostic": query_agnostic,
                   "by_depth": {str(d): h / n for d, (h, n) in hits.items() if n}},
                  tokens=tokens, seconds=time.perf_counter() - t0)
