"""Evaluation: perplexity (strided, or context→continuation through the cache), multiple choice by
log-likelihood, and the cost figures every report carries (README.md, Commands).

The LM head (49152 classes for SmolLM2) costs as much as the decoder stack when applied everywhere,
so the multiple-choice and cached protocols run the decoder and apply the head only where scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adaflex.search.cost import Shape

from .data import MCItem
from .errors import UsageError, naming
from .progress import progress
from .state import state_of

# ---- the dense reference a retrofitted model is measured against ----


def dense_reference(config) -> dict:
    """Shapes of the dense model, kept with a retrofitted one (removed blocks still count here). The block's
    MACs are the cost model's (search/cost.py `Shape.block_macs`: q, k, v, o, gate, up, down)."""
    s = Shape.from_config(config)
    return {
        "num_layers": s.num_layers,
        "hidden_size": s.hidden_size,
        "num_kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab_size,
        "block_linear_params": s.block_macs,
        "linear_macs_per_token": s.block_macs * s.num_layers + s.head_macs,
    }


def reference_of(model) -> dict:
    st = state_of(model)
    if st.dense is None:
        st.dense = dense_reference(model.config)
    return st.dense


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


# ---- forward helpers ----


def hidden_states(model, input_ids, attention_mask=None, **kw):
    """Final normalised hidden states of the decoder (no LM head)."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)[0]


def head(model, h):
    return model.get_output_embeddings()(h).float()


def _make_cache(model):
    """The cache a model runs with: a retrofit (KV budgets) may install its own factory."""
    factory = state_of(model).make_cache
    if factory is not None:
        return factory()
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@dataclass
class Result:
    task: str
    metric: str
    value: float
    n: int
    extra: dict = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        out = {"task": self.task, "metric": self.metric, "value": self.value, "n": self.n}
        out.update(self.extra)
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else None
        return out


# ---- perplexity ----


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
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
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
        h = hidden_states(model, x)
        for row, (_, first) in enumerate(chunk):
            logits = head(model, h[row, first - 1 : -1])
            nll, n = _nll(logits, x[row, first:])
            total, count = total + nll, count + n
    seconds = time.perf_counter() - t0
    return Result("perplexity", "perplexity", math.exp(total / count), len(windows),
                  {"nll": total / count, "scored_tokens": count, "seq_len": seq_len, "stride": stride},
                  tokens=len(windows) * seq_len, seconds=seconds)


@torch.no_grad()
def continuation_perplexity(model, tokenizer, text: str, context: int, continuation: int, batch_size: int = 4,
                            limit: int | None = None, label: str = "perplexity") -> Result:
    """Prefill `context` tokens through the model's cache (so KV eviction applies), then score the next
    `continuation` tokens, window after window of context + continuation tokens."""
    span = context + continuation
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    starts = list(range(0, ids.numel() - span + 1, span))
    if not starts:
        raise UsageError(f"{label}: only {ids.numel()} tokens, fewer than context + continuation = {span}")
    if limit:
        starts = starts[:limit]
    total, count, t0 = 0.0, 0, time.perf_counter()
    for i in progress(range(0, len(starts), batch_size), desc=label, total=math.ceil(len(starts) / batch_size)):
        x = torch.stack([ids[s : s + span] for s in starts[i : i + batch_size]])
        cache = _make_cache(model)
        pre = model(input_ids=x[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
        out = model(input_ids=x[:, context:], cache=pre.cache, use_cache=True)
        logits = torch.cat([pre.logits[:, -1:], out.logits[:, :-1]], dim=1).float()
        nll, n = _nll(logits, x[:, context:])
        total, count = total + nll, count + n
    seconds = time.perf_counter() - t0
    return Result("perplexity", "perplexity", math.exp(total / count), len(starts),
                  {"nll": total / count, "scored_tokens": count, "context": context, "continuation": continuation},
                  tokens=len(starts) * span, seconds=seconds)


# ---- multiple choice ----


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
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
        pairs = [_encode_pair(tokenizer, it.context, ch) for ch in it.choices]
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
    decoder = model.get_decoder()
    for batch in progress(batches, desc=label, disable=not show_progress):
        n = len(items[batch[0]].choices)
        ctxs = [enc[i][0][:-1] for i in batch]  # the last context token starts the continuation pass
        width = max(len(c) for c in ctxs)
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        m = torch.zeros((len(batch), width), dtype=torch.long)
        for r, c in enumerate(ctxs):
            if c:
                x[r, width - len(c):] = torch.tensor(c)
                m[r, width - len(c):] = 1
        cache = _make_cache(model)
        if width:
            decoder(input_ids=x, attention_mask=m, cache=cache, use_cache=True)
            cache.batch_repeat_interleave(n)
        rows = [([enc[i][0][-1]] + cont[:-1], cont) for i in batch for cont in enc[i][1]]
        cw = max(len(inp) for inp, _ in rows)
        y = torch.full((len(rows), cw), pad, dtype=torch.long)
        my = torch.zeros((len(rows), cw), dtype=torch.long)
        for r, (inp, _) in enumerate(rows):
            y[r, : len(inp)] = torch.tensor(inp)
            my[r, : len(inp)] = 1
        mask = torch.cat([m.repeat_interleave(n, 0), my], dim=1)
        h = decoder(input_ids=y, attention_mask=mask, cache=cache if width else None, use_cache=bool(width))[0]
        sel = my.bool()
        targets = torch.tensor([t for _, cont in rows for t in cont])
        logp = torch.log_softmax(head(model, h[sel]), dim=-1)
        picked = logp[torch.arange(len(targets)), targets]
        owner = torch.arange(len(rows)).repeat_interleave(my.sum(1))
        sums = torch.zeros(len(rows)).index_add_(0, owner, picked)
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


# ---- cost figures ----


@torch.no_grad()
def cost_figures(model, probe_ids: torch.Tensor) -> dict:
    """Measured on one probe forward: blocks executed, KV bytes held, linear MACs, weight sparsity and
    adaflex's own trainable parameters, each relative to the dense reference."""
    ref = reference_of(model)
    rows = probe_ids.shape[0]
    executed = [0]
    macs = [0]

    def count_block(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        executed[0] += h.shape[0]

    def count_linear(mod, args, _out):
        macs[0] += mod.in_features * mod.out_features * args[0].numel() // args[0].shape[-1]

    hooks = [blk.register_forward_pre_hook(count_block, with_kwargs=True) for blk in decoder_layers(model)]
    hooks += [m.register_forward_hook(count_linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        cache = _make_cache(model)
        model(input_ids=probe_ids, cache=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    kv_bytes = cache.stored_bytes() if hasattr(cache, "stored_bytes") else sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )
    elem = next(model.parameters()).element_size()
    dense_kv = ref["num_layers"] * 2 * rows * ref["num_kv_heads"] * probe_ids.shape[1] * ref["head_dim"] * elem
    block_linears = [m for blk in decoder_layers(model) for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    nonzero = sum(int(torch.count_nonzero(m.weight)) for m in block_linears)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "adaflex" in n)
    return {
        "num_layers": ref["num_layers"],
        "layers_executed_mean": executed[0] / rows,
        "kv_bytes_ratio": kv_bytes / dense_kv,
        "sparsity": 1 - nonzero / (ref["block_linear_params"] * ref["num_layers"]),
        "trainable_params": trainable,
        "flops_ratio": macs[0] / (rows * probe_ids.shape[1]) / ref["linear_macs_per_token"],
    }


def probe_ids(tokenizer, text: str, rows: int = 2, length: int = 128) -> torch.Tensor:
    ids = tokenizer(text[: 40 * rows * length], return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < rows * length:
        ids = ids.repeat(rows * length // max(1, ids.numel()) + 1)
    return ids[: rows * length].view(rows, length)


# ---- one evaluation spec, as the CLI and the recipes name it ----


def warn_positions(model, task: str, seq_len: int, context: int | None, continuation: int | None, label: str) -> None:
    """One warning line when an evaluation asks for more positions than the model was trained on (its scores
    would measure extrapolation, not the retrofit)."""
    import sys

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    need = (context or 0) + (continuation or 0) if context is not None else (seq_len if task == "perplexity" else 0)
    if isinstance(limit, int) and need > limit:
        print(f"adaflex: warning: {label}: {need} positions exceed the model's max_position_embeddings ({limit})",
              file=sys.stderr)


def run_eval(model, tokenizer, task: str, data: str, **kw) -> dict:
    """Score `model` on `data` (see _run_eval); an error about the data names it."""
    with naming(data):
        return _run_eval(model, tokenizer, task, data, **kw)


def _run_eval(model, tokenizer, task: str, data: str, *, layout: str = "auto", limit: int | None = None,
              seq_len: int = 512, stride: int | None = None, context: int | None = None,
              continuation: int | None = None, batch_size: int = 8, label: str | None = None,
              depths=None, query_agnostic: bool | None = None, source=None, reference=None) -> dict:
    """`source`: the run's resolved data source (retrofit/sources.py), else `data` is resolved here (a file, an
    hf: dataset, or text this model generates). `reference`: where a fidelity task keeps the dense top-k."""
    label = label or task
    warn_positions(model, task, seq_len, context, continuation, label)
    if source is None:
        from .sources import RunData

        source = RunData().bind(model, tokenizer).get(data, layout)
    if task == "perplexity":
        text = source.text()
        if (context is None) != (continuation is None):
            raise UsageError("--context and --continuation go together")
        if context is not None:
            res = continuation_perplexity(model, tokenizer, text, context, continuation,
                                          batch_size=max(1, batch_size // 2), limit=limit, label=label)
        else:
            res = perplexity(model, tokenizer, text, seq_len, stride, batch_size=max(1, batch_size // 2),
                             limit=limit, label=label)
        probe_text = text
    elif task == "mc":
        items = source.mc(limit)
        res = multiple_choice(model, tokenizer, items, batch_size=batch_size, label=label)
        probe_text = "\n".join(it.context + it.choices[it.label] for it in items[:64])
    elif task == "passkey":
        from .kv.passkey import passkey

        if context is None:
            raise UsageError("--context: required by --task passkey (prompt length in tokens)")
        text = source.text()
        res = passkey(model, tokenizer, text, context, depths=depths, limit=limit, query_agnostic=query_agnostic,
                      batch_size=max(1, batch_size // 4), label=label)
        probe_text = text
    elif task == "fidelity":
        from .fidelity import fidelity

        res = fidelity(model, tokenizer, source, seq_len=seq_len, limit=limit, batch_size=max(1, batch_size // 2),
                       reference=reference, label=label)
        probe_text = source.text()
    else:
        raise UsageError(f"unknown task '{task}' (perplexity, mc, passkey, fidelity)")
    out = res.to_dict()
    out["data"] = str(data)
    out.update(cost_figures(model, probe_ids(tokenizer, probe_text)))
    return out
