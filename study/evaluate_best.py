"""`adaflex search --evaluate`: the recipe's `eval:` on dense, the best trial and the best single-method trial."""

from __future__ import annotations

import copy
import gc
import os
import shutil
from pathlib import Path

from .session import Session


def evaluate_best(study, session: Session, summary: dict, out: Path, log) -> list[dict]:
    """The recipe's `eval:` on dense, the best trial and the best single-method trial, each model rebuilt from
    the trial's settings in memory (stage results memoised by the study are reused). Results are kept per
    model and eval under OUT/eval/, so an interrupted evaluation resumes."""
    from adaflex.retrofit.pipeline import evaluate_recipe

    picks = [("dense", None)]
    for key in ("best", "best_single"):  # the best may itself be the best single-method trial: once
        if summary.get(key) and f"trial-{summary[key]['trial']}" not in dict(picks):
            picks.append((f"trial-{summary[key]['trial']}", summary[key]))
    rows = []
    state = out / "eval"
    state.mkdir(parents=True, exist_ok=True)
    for tag, pick in picks:
        model = session.pristine if pick is None else copy.deepcopy(session.pristine)
        tmp = out / "tmp" / f"eval-{tag}-{os.getpid()}"
        try:
            if pick is not None:
                session.apply_stages(model, session.trial_recipe([tuple(x) for x in pick["stages"]]), tmp)
            results = evaluate_recipe(model, session.tok, session.recipe, state, tag, log, session.data)
        finally:
            if pick is not None:
                del model
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()
        rows.append(
            {
                "model": "dense" if pick is None else tag,
                "stages": "dense" if pick is None else "+".join(m for m, _ in pick["stages"]),
                "flops_ratio": 1.0 if pick is None else pick["cost"]["flops_ratio"],
                "results": [{k: r[k] for k in ("name", "metric", "value", "n", "acc_norm") if k in r} for r in results],
            }
        )
    return rows

