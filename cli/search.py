"""adaflex search [MODEL] --budget SPEC [--recipe FILE] [--trials N] [--storage URL] [--study NAME] [--out DIR]"""

from __future__ import annotations

from pathlib import Path

import typer

from .common import Format, emit_json, err, guard, log, out, result_table


def search(
    model: str = typer.Argument(None, help="name (smollm2-135m), HF directory, export, or hub id"),
    budget: str = typer.Option(
        ..., "--budget", "-b", help="fraction of dense FLOPs (0.6) or axes: flops=0.6,kv=0.25,params=0.02"
    ),
    recipe: str = typer.Option(None, "--recipe", "-r", help="recipe file or packaged name (default quickstart)"),
    trials: int = typer.Option(
        None,
        "--trials",
        "-n",
        min=1,
        help="finished trials the study should hold (default: the recipe's search.trials, else 20)",
    ),
    storage: str = typer.Option(
        None,
        "--storage",
        help="Optuna RDB URL (postgresql://...) or journal file (journal:PATH, *.log); default: OUT/study.db",
    ),
    study: str = typer.Option(None, "--study", help="study name (default: derived from recipe, model and budget)"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="output folder (default runs/STUDY)"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key: KEY=VALUE"),
    pareto: bool = typer.Option(False, "--pareto", help="cost axes become objectives too: return the Pareto front"),
    heartbeat: int = typer.Option(
        30, "--heartbeat", min=1, help="seconds between RDB heartbeats; a trial silent for twice that is retried"
    ),
    evaluate: bool = typer.Option(
        False, "--evaluate", help="then run the recipe's eval: on dense, the best and the best single-method trial"
    ),
    allow_bin: bool = typer.Option(False, "--allow-bin", help="allow pickled .bin weights (loaded weights_only)"),
    heal_top: int = typer.Option(
        None, "--heal-top", min=0,
        help="then heal the K best trials and pick by healed quality (default: search.heal.top)"
    ),
    format: Format = typer.Option(Format.human, "--format"),
):
    """Search the recipe's stages and settings for the best quality within a cost budget (Optuna)."""
    with guard():
        from adaflex.retrofit import checks
        from adaflex.retrofit.errors import UsageError
        from adaflex.retrofit.recipe import apply_override, packaged, read_yaml, resolve_recipe_path, validate
        from adaflex.search.cost import parse_budget
        from adaflex.study import search as run_search

        try:
            axes = parse_budget(budget)
        except ValueError as e:
            raise UsageError(f"--budget {budget}: {e}") from None
        path = resolve_recipe_path(recipe) if recipe else packaged("quickstart.yaml")
        raw = read_yaml(path)
        for item in overrides:
            apply_override(raw, item)
        rec = validate(raw, str(path))
        data = checks.static(rec, str(path))  # the sources read here serve the whole search
        summary = run_search(
            rec,
            raw,
            model or rec.model,
            axes,
            trials=trials,
            storage=storage,
            study_name=study,
            out=out_dir,
            pareto=pareto,
            heartbeat=heartbeat,
            evaluate=evaluate,
            log=log,
            allow_bin=allow_bin,
            data=data,
            heal_top=heal_top,
        )
        if format is Format.json:
            err.print(_table(summary))
            emit_json({k: v for k, v in summary.items() if k != "table"})
            return
        out.print(_table(summary))
        b = summary["best"]
        t = summary["trials"]
        out.print(
            f"trials: {t['complete']} complete, {t['pruned']} pruned, {t['failed']} failed "
            f"({t['feasible']} within budget; {t['this_worker']} run by this worker)"
        )
        out.print(
            f"best: trial {b['trial']} ({'+'.join(m for m, _ in b['stages']) or 'dense'}), "
            f"perplexity {b['quality']['value']:.4g}, flops_ratio {b['flops_ratio']:.4f}"
        )
        for h in summary.get("healed") or []:
            out.print(f"healed: trial {h['trial']}, perplexity {h['unhealed']:.4g} -> "
                      + (f"{h['healed']:.4g}" if h["healed"] is not None else f"failed ({h.get('reason')})"))
        out.print(f"recipe: {summary['recipe']}  (run it with `adaflex retrofit --recipe {summary['recipe']}`)")
        out.print(f"trials.csv, pareto.png in {summary['out']}")
        if summary.get("evaluation"):
            out.print(_eval_table(summary["evaluation"]))


def _eval_table(rows: list[dict]):
    """One row per model, one column per (eval, metric): perplexity, acc and acc_norm."""
    cols: list[tuple[str, str]] = []
    body = []
    for row in rows:
        vals = {}
        for r in row["results"]:
            vals[(r["name"], r["metric"])] = r["value"]
            if "acc_norm" in r:
                vals[(r["name"], "acc_norm")] = r["acc_norm"]
        cols += [c for c in vals if c not in cols]
        body.append((row, vals))
    return result_table(
        "held to the recipe's eval (dense, best, best single-method)",
        ["model", "stages", "flops_ratio", *[f"{n} {m}" for n, m in cols]],
        [[row["model"], row["stages"], row["flops_ratio"], *[vals.get(c) for c in cols]] for row, vals in body],
    )


def _table(summary: dict):
    rows = [["dense", "", summary["dense"]["quality"], 1.0, 1.0, 0.0, ""]]
    front = set(summary["pareto_front"])
    for r in summary["table"]:
        rows.append(
            [
                str(r["number"]) + (" *" if r["number"] in front else ""),
                r["stages"],
                r["quality"],
                r["flops_ratio"],
                r["kv_ratio"],
                r["params_ratio"],
                r["worker"],
            ]
        )
    return result_table(
        f"best trials within budget (* Pareto front), {summary['trials']['total']} trials",
        ["trial", "stages", "perplexity", "flops_ratio", "kv_ratio", "params_ratio", "worker"],
        rows,
    )
