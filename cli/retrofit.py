"""adaflex retrofit [MODEL] [--recipe FILE] [--out DIR] [--set KEY=VALUE ...] [--seed N] [--format human|json]"""

from __future__ import annotations

from pathlib import Path

import typer

from .common import COST_KEYS, Format, emit_json, guard, log, out, result_table


def retrofit(
    model: str = typer.Argument(None, help="name (smollm2-135m), HF directory, export, or hub id"),
    recipe: str = typer.Option(None, "--recipe", "-r", help="recipe file or packaged name (default quickstart)"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="run directory (resumable)"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key: KEY=VALUE"),
    seed: int = typer.Option(None, "--seed", help="overrides the recipe's seed"),
    evals: list[str] = typer.Option([], "--eval", help="also evaluate on FILE or hf:ID (perplexity for text, "
                                                       "multiple choice for ARC/PIQA/HellaSwag records)"),
    eval_limit: int = typer.Option(None, "--eval-limit", min=1, help="first N windows / items of each --eval"),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="allow pickled .bin weights (loaded weights_only)"),
    format: Format = typer.Option(Format.human, "--format"),
):
    """Apply a recipe's stages and report dense vs retrofitted, side by side."""
    with guard():
        from adaflex.retrofit import checks
        from adaflex.retrofit.pipeline import run
        from adaflex.retrofit.recipe import load_recipe, packaged, resolve_recipe_path

        path = resolve_recipe_path(recipe) if recipe else packaged("quickstart.yaml")
        sets = list(overrides) + ([f"seed={seed}"] if seed is not None else [])
        rec = load_recipe(path, sets)
        data = None
        if evals:
            from adaflex.retrofit.recipe import with_evals

            rec, data = with_evals(rec, evals, eval_limit, str(path))
        data = checks.static(rec, str(path), data)  # the sources read here serve the whole run
        report = run(rec, model or rec.model, out=out_dir, log=log, allow_bin=allow_bin, data=data)
        if format is Format.json:
            emit_json(report)
            return
        rows = [[k, report["dense"].get(k), report["retrofitted"].get(k)] for k in COST_KEYS if k in report["dense"]]
        out.print(result_table("cost (probe forward)", ["figure", "dense", "retrofitted"], rows))
        if report["evals"]:
            ev_rows = []
            for e in report["evals"]:
                d, r = e["dense"], e["retrofitted"]
                ev_rows.append([e["name"], e["metric"], d["value"], r["value"], e["ratio"]])
                for key in ("kl", "top1_agreement"):  # fidelity to the dense model
                    if key in d:
                        ev_rows.append([e["name"], key, d[key], r[key], None])
                if "kv_bytes_ratio_at_context" in d:  # the cache at the evaluation's own length, not the probe's
                    ev_rows.append([e["name"], f"kv_bytes_ratio at {d['kv_context']} tokens",
                                    d["kv_bytes_ratio_at_context"], r.get("kv_bytes_ratio_at_context"), None])
                if "acc_norm" in d:
                    ratio = r["acc_norm"] / d["acc_norm"] if d["acc_norm"] else None
                    ev_rows.append([e["name"], "acc_norm", d["acc_norm"], r["acc_norm"], ratio])
            out.print(result_table("quality", ["eval", "metric", "dense", "retrofitted", "ratio"], ev_rows))
        if report.get("after_each_stage"):  # a composed recipe: what each stage adds to cost and quality
            keys = ["perplexity", "flops_ratio", "kv_bytes_ratio", "layers_executed_mean", "sparsity",
                    "trainable_params"]
            rows = [[a["stage"], *[a.get(k) for k in keys]] for a in report["after_each_stage"]]
            title = f"after each stage ({report['after_each_stage'][0]['protocol']}; cost on the probe)"
            out.print(result_table(title, ["after", *keys], rows))
        if report.get("run_dir"):
            run_dir = report["run_dir"]
            out.print(f"run directory: {run_dir}  (export with `adaflex export {run_dir} --out DIR`)")
