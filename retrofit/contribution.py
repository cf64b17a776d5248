"""Each stage's contribution to cost and quality: the figures after every stage of a composed recipe.

Quality is the search objective's protocol (continuation perplexity through the model's cache on a few
windows from the end of a text, so KV budgets and routes apply); cost is the probe forward's figures."""

from __future__ import annotations

from .errors import UsageError
from .search_space import SearchSection


def quality_text(text: str, tokens: int) -> str:
    """The end of `text`, long enough for `tokens` tokens under any tokenizer (bytes >= tokens)."""
    return text[-tokens * 8 :] if len(text) > tokens * 8 else text


def probe_quality(model, tok, text: str, context: int, continuation: int, windows: int) -> float:
    """Continuation perplexity on `windows` windows from the end of `text`."""
    from .evaluate import continuation_perplexity

    res = continuation_perplexity(
        model,
        tok,
        quality_text(text, windows * (context + continuation)),
        context,
        continuation,
        batch_size=min(4, windows),
        limit=windows,
        label="quality",
    )
    return float(res.value)


def quality_source(recipe) -> tuple[str, str, int, int, int]:
    """(path, layout, context, continuation, windows): `search.quality`, else the first perplexity or fidelity
    eval's data, else the calibration data; context and continuation split the calibration seq_len 3:1."""
    q = (recipe.search or SearchSection()).quality
    cal = recipe.data.calibration
    path, layout = q.data, q.layout
    if path is None:
        # held-out text first: a perplexity or fidelity evaluation's (generated:test in the quickstart)
        ppl = [e for e in recipe.eval if e.task in ("perplexity", "fidelity")]
        if ppl:
            path, layout = ppl[0].data, ppl[0].layout
        elif cal is not None:
            path, layout = cal.path, cal.layout
        else:
            raise UsageError(
                "recipe: search.quality.data: needed (no perplexity eval nor calibration data to default to)"
            )
    seq = cal.seq_len if cal is not None else 256
    context = q.context or max(8, seq * 3 // 4)
    continuation = q.continuation or max(1, seq - context)
    return path, layout if layout in ("auto", "text", "jsonl") else "auto", context, continuation, q.windows


class Contributions:
    """Measures the model after each stage (and once dense) for the report."""

    def __init__(self, recipe, tok, probe, data=None):
        from .sources import RunData

        path, layout, self.context, self.continuation, self.windows = quality_source(recipe)
        data = data or RunData(recipe)
        self.text, self.tok, self.probe = data.text(path, layout, "search.quality.data"), tok, probe

    def measure(self, model, stage: str, cost: dict | None = None) -> dict:
        """`cost`: the model's cost_figures when the caller has them already (no second probe pass)."""
        from .evaluate import cost_figures

        q = probe_quality(model, self.tok, self.text, self.context, self.continuation, self.windows)
        return {
            "stage": stage,
            "perplexity": q,
            **(cost if cost is not None else cost_figures(model, self.probe)),
            "protocol": f"continuation perplexity, {self.windows} x ({self.context} + {self.continuation})",
        }
