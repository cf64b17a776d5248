"""Evaluation: the `eval` tasks a recipe or `adaflex eval` names, each scored with the cost figures every report
carries (README.md, Commands). One module per task:

- ppl.py: perplexity, strided or context → continuation through the model's cache;
- mc.py: multiple choice by log-likelihood;
- retrieval.py: passkey retrieval through the cache;
- fidelity.py: KL, top-1 agreement and own-continuation perplexity against the dense model's top-k;
- cost.py: the cost figures of one probe forward (blocks executed, KV bytes, MACs, sparsity), and the KV bytes
  held at the evaluation's own context;
- result.py: the Result every task returns.

Where the model's parts are and how its logits are computed is retrofit/arch.py's business.
"""

from __future__ import annotations

from ..errors import UsageError, naming
from .cost import cost_figures, kv_at_context, probe_ids
from .fidelity import fidelity
from .mc import choice_logliks, mc_scores, multiple_choice
from .ppl import continuation_perplexity, perplexity
from .result import Result
from .retrieval import passkey

__all__ = ["Result", "choice_logliks", "continuation_perplexity", "cost_figures", "kv_at_context", "mc_scores",
           "multiple_choice", "passkey", "perplexity", "probe_ids", "run_eval", "warn_positions"]


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
        from ..sources import RunData

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
        probe_text, own = text, context if context is not None else seq_len
    elif task == "mc":
        items = source.mc(limit)
        res = multiple_choice(model, tokenizer, items, batch_size=batch_size, label=label)
        probe_text = "\n".join(it.context + it.choices[it.label] for it in items[:64])
        own = max(len(tokenizer(it.context + it.choices[it.label], add_special_tokens=False).input_ids)
                  for it in items[:64])  # the longest prompt it scores
    elif task == "passkey":
        if context is None:
            raise UsageError("--context: required by --task passkey (prompt length in tokens)")
        text = source.text()
        res = passkey(model, tokenizer, text, context, depths=depths, limit=limit, query_agnostic=query_agnostic,
                      batch_size=max(1, batch_size // 4), label=label)
        probe_text, own = text, context
    elif task == "fidelity":
        res = fidelity(model, tokenizer, source, seq_len=seq_len, limit=limit, batch_size=max(1, batch_size // 2),
                       reference=reference, label=label)
        probe_text, own = source.text(), seq_len
    else:
        raise UsageError(f"unknown task '{task}' (perplexity, mc, passkey, fidelity)")
    out = res.to_dict()
    out["data"] = str(data)
    out.update(cost_figures(model, probe_ids(tokenizer, probe_text)))
    # the probe's 128 tokens can misstate the KV bytes at the evaluation's own length (kv's floor of sinks + window)
    out.update(kv_at_context(model, probe_ids(tokenizer, probe_text, rows=1, length=own)))
    return out
