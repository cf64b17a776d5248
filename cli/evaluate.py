"""adaflex eval MODEL_OR_DIR --task perplexity|mc|passkey|fidelity --data FILE|hf:ID|generated[:test]
 [--limit N] [--context N] [--continuation N]
[--depths 0.1,0.5,0.9] [--query-agnostic]"""

from __future__ import annotations

from enum import Enum

import typer

from .common import COST_KEYS, Format, emit_json, guard, out, result_table


class Task(str, Enum):
    perplexity = "perplexity"
    mc = "mc"
    passkey = "passkey"
    fidelity = "fidelity"


def evaluate(
    model: str = typer.Argument("smollm2-135m", help="model name, HF directory, export or run directory"),
    task: Task = typer.Option(..., "--task"),
    data: str = typer.Option(..., "--data", help="text, JSONL (`text` or ARC/PIQA/HellaSwag), Parquet/Arrow, "
                                                  "hf:NAME\\[/CONFIG]\\[:SPLIT], or generated\\[:test] (text this "
                                                  "model writes)"),
    limit: int = typer.Option(None, "--limit", min=1, help="first N items / windows"),
    context: int = typer.Option(None, "--context", min=1, help="prefill this many tokens through the cache"),
    continuation: int = typer.Option(None, "--continuation", min=1, help="then score this many tokens"),
    seq_len: int = typer.Option(512, "--seq-len", min=8, help="window of strided perplexity"),
    stride: int = typer.Option(None, "--stride", min=1, help="step of strided perplexity (default: --seq-len)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    depths: str = typer.Option(None, "--depths", help="passkey: relative needle depths, e.g. 0.1,0.5,0.9"),
    query_agnostic: bool = typer.Option(None, "--query-agnostic/--query-aware",
                                        help="passkey: compress the context before the question arrives "
                                             "(default: the model's kv setting, else query-aware)"),
    layout: str = typer.Option("auto", "--layout", help="auto, text, jsonl, arc, piqa, hellaswag"),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="allow pickled .bin weights (loaded weights_only)"),
    format: Format = typer.Option(Format.human, "--format"),
):
    """Score a model: perplexity, multiple choice (acc, acc_norm), with its cost figures."""
    with guard():

        from adaflex.retrofit import arch, restore
        from adaflex.retrofit.errors import UsageError
        from adaflex.retrofit.evaluate import run_eval
        from adaflex.retrofit.sources import RunData, check_spec

        try:
            check_spec(data)
        except ValueError as e:
            raise UsageError(f"--data {e}") from None
        if layout not in ("auto", "text", "jsonl", "arc", "piqa", "hellaswag"):
            raise UsageError(f"--layout {layout}: expected auto, text, jsonl, arc, piqa or hellaswag")
        sources = RunData()
        generated = data.startswith("generated")
        if not generated:  # read before the model loads: layout errors first
            src = sources.get(data, layout, "--data")
            src.mc(1) if task is Task.mc else src.text()
        m, tok = restore.load(model, allow_bin=allow_bin)
        arch.check(m)  # an unknown architecture is refused before any scoring
        # generated text comes from this model; a fidelity task here compares the model with itself (KL 0): the
        # dense-vs-retrofitted comparison is `adaflex retrofit` with `task: fidelity` in its eval
        src = sources.bind(m, tok).get(data, layout, "--data")
        res = run_eval(m, tok, task.value, data, layout=layout, limit=limit, seq_len=seq_len, stride=stride,
                       context=context, continuation=continuation, batch_size=batch_size, label=task.value,
                       depths=depths, query_agnostic=query_agnostic, source=src)
        res["model"] = model
        if format is Format.json:
            emit_json(res)
            return
        rows = [["model", model], ["data", data], ["n", res["n"]], [res["metric"], res["value"]]]
        if "acc_norm" in res:
            rows.append(["acc_norm", res["acc_norm"]])
        rows += [[k, res.get(k)] for k in COST_KEYS]
        out.print(result_table(f"eval: {task.value}", ["figure", "value"], rows))
