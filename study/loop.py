"""`adaflex search`: an Optuna study over a recipe's searchable settings, quality under a cost budget.

The budget is a constraint (`constraints_func`), so the sampler learns where the feasible region is; `--pareto`
makes the cost axes objectives as well. `--trials N` is the study's total: a worker stops once N trials have
finished, so a restarted worker continues where the study stands. A trial whose worker died is retried (see
storage.py); an interrupted trial (Ctrl-C) is re-enqueued before the worker exits with 130. The trial objective
is session.py's, the files a study leaves are outputs.py's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from adaflex.retrofit import io, models, registry, restore, rundir
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.progress import bar
from adaflex.retrofit.recipe import Recipe
from adaflex.retrofit.search_space import HEAL, SearchSection, build
from adaflex.search.cost import AXES, feasible, format_budget
from adaflex.search.errors import BudgetInfeasible

from . import heal as healing
from .evaluate_best import evaluate_best
from .outputs import finish
from .session import Session, Surplus
from .storage import journal_path, open_storage, recover_dead_local, retry


class _QuietSurplus(logging.Filter):
    """Drops Optuna's two warnings for a surplus trial (_log_trial says it); a real failure keeps its first
    warning, which carries the error."""

    def filter(self, record):
        msg = record.getMessage()
        return "Surplus" not in msg and not msg.endswith("failed with value None.")


def _suppress_optuna_noise():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for h in logging.getLogger("optuna").handlers:  # surplus trials are logged by _log_trial
        if not any(isinstance(f, _QuietSurplus) for f in h.filters):
            h.addFilter(_QuietSurplus())
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")



def default_study_name(recipe: Recipe, model_name: str, budget: dict, pareto: bool) -> str:
    key = json.dumps([recipe.sha256(), model_name, budget, pareto], sort_keys=True)
    return "adaflex-" + hashlib.sha256(key.encode()).hexdigest()[:10]


def search(
    recipe: Recipe,
    raw: dict,
    model_spec: str | None,
    budget: dict[str, float],
    *,
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    out: str | Path | None = None,
    pareto: bool = False,
    heartbeat: int = 30,
    evaluate: bool = False,
    log=None,
    show_progress: bool | None = None,
    allow_bin: bool = False,
    data=None,
    heal_top: int | None = None,
) -> dict:
    """Run (or continue) a study; returns the summary that `--format json` prints. `evaluate`: afterwards,
    hold dense, the best trial and the best single-method trial to the recipe's `eval:` side by side.
    `heal_top` (default `search.heal.top`): heal that many best trials and pick by healed quality (heal.py)."""
    import optuna
    from optuna.trial import TrialState

    log = log or (lambda msg: print(f"adaflex: {msg}", file=sys.stderr))
    _suppress_optuna_noise()
    from adaflex.retrofit.pipeline import preflight

    data = preflight(recipe, data)  # `data`: the sources the CLI's checks read already
    if evaluate and not recipe.eval:  # refused before the search, not after it
        raise UsageError("--evaluate: the recipe has no `eval:` section")
    model_name = str(model_spec or recipe.model or models.DEFAULT_MODEL)
    n_trials = trials or (recipe.search or SearchSection()).trials
    k_heal = healing.heal_top_of(recipe, heal_top, n_trials)
    name = study_name or default_study_name(recipe, model_name, budget, pareto)
    out = Path(out) if out is not None else Path("runs") / name
    if storage is not None and journal_path(storage) is None and "://" not in storage:
        open_storage(storage, out, heartbeat)  # raises the usage error before anything is loaded
    for sp in build(recipe, 64):  # checks that need no model (the block count only bounds default knobs)
        cfg = registry.config_class(sp.method).model_validate(sp.base)
        if registry.get(sp.method).needs_calibration(cfg) and recipe.data.calibration is None:
            raise UsageError(f"recipe: data.calibration: required by the {sp.method} stage")
    rundir.hold(out)  # one writer per --out, taken before the model loads so that a second one stops at once
    model, tok = restore.load(model_spec or recipe.model, allow_bin=allow_bin)
    raw = {**raw, "model": model_name}
    session = Session(recipe, raw, model, tok, model_name, budget, pareto, out, log, data)
    if k_heal:  # the trials are scored unhealed; heal joins only the top k afterwards
        session.spaces = [sp for sp in session.spaces if sp.method != HEAL]
        if not session.spaces:
            raise UsageError("recipe: stages: nothing to search besides heal")
    session.total = n_trials
    low = session.cheapest()
    if low is not None and not feasible(low, budget):
        got = format_budget({a: low.axis(a) for a in budget})
        raise BudgetInfeasible(
            f"--budget {format_budget(budget)}: the cheapest configuration of the search space "
            f"costs {got} (predicted, every stage at its cheapest setting)"
        )
    out.mkdir(parents=True, exist_ok=True)
    st, label = open_storage(storage, out, heartbeat)
    meta = {"recipe_sha256": recipe.sha256(), "model": model_name, "budget": budget, "pareto": pareto}
    directions = ["minimize"] * (1 + len(budget)) if pareto else ["minimize"]
    k = len(budget)
    sampler_seed = recipe.seed
    try:
        existing = optuna.load_study(study_name=name, storage=st)
        sampler_seed += 7919 * len(existing.trials) + (os.getpid() if storage else 0)
    except KeyError:
        existing = None
    sampler = optuna.samplers.TPESampler(
        seed=sampler_seed % 2**31,
        n_startup_trials=min(10, max(3, n_trials // 3)),
        multivariate=True,
        group=True,
        constant_liar=True,
        constraints_func=lambda t: t.user_attrs.get("constraints", [1.0] * k),
    )
    try:
        study = optuna.create_study(
            storage=st, study_name=name, directions=directions, sampler=sampler, load_if_exists=True
        )
    except ValueError as e:  # e.g. the same name with other directions
        raise UsageError(f"--study {name}: {e}") from None
    held = study.user_attrs.get("adaflex")
    if held is None:
        study.set_user_attr("adaflex", meta)
    elif held != json.loads(json.dumps(meta)):
        raise UsageError(
            f"--study {name}: holds a search of another recipe, model or budget ({held['model']}, "
            f"{format_budget(held['budget'])}); choose another --study or --out"
        )
    if "dense_quality" not in study.user_attrs:
        study.set_user_attr("dense_quality", session.evaluate_dense())
    session.enqueue_start(study)
    log(
        f"study {name} in {label}: {n_trials} trials, budget {format_budget(budget)}, "
        f"{len(session.spaces)} stages searched ({', '.join(sp.method for sp in session.spaces)})"
    )

    interrupted = False
    try:
        with bar("search", n_trials, show_progress) as update:
            while True:
                recover_dead_local(study, log)
                if isinstance(st, optuna.storages.RDBStorage):
                    optuna.storages.fail_stale_trials(study)
                ts = study.get_trials(deepcopy=False)
                finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ts)
                update(min(finished, n_trials))
                if finished >= n_trials:
                    break
                running = [t for t in ts if t.state == TrialState.RUNNING]
                if finished + len(running) >= n_trials:  # the last trials are running elsewhere: wait
                    time.sleep(min(2.0, heartbeat / 2))
                    continue
                session.current = None
                study.optimize(session.objective, n_trials=1, catch=(Surplus,))
                t = study.trials[session.current] if session.current is not None else None
                if t is not None:
                    session.ran += t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                    _log_trial(t, budget, log)
    except KeyboardInterrupt:
        interrupted = True
        if session.current is not None:
            t = study.trials[session.current]
            if t.state in (TrialState.FAIL, TrialState.RUNNING):
                if t.state == TrialState.RUNNING:
                    study.tell(t.number, state=TrialState.FAIL)
                retry(study, study.trials[t.number])
                log(f"trial {t.number}: interrupted; re-enqueued for the next run")
    healed = None
    if k_heal and not interrupted:
        healed = healing.heal_top(study, session, k_heal, healing.heal_settings(recipe), log)
    summary = finish(study, session, budget, pareto, n_trials, name, label, out, healed)
    try:
        (out / "tmp").rmdir()  # trial folders are removed as they finish; the parent goes when empty
    except OSError:
        pass
    if interrupted:
        raise KeyboardInterrupt
    if summary["best"] is None:
        raise BudgetInfeasible(summary["infeasible"])
    if evaluate:
        summary["evaluation"] = evaluate_best(study, session, summary, out, log)
        io.write_json(out / "search.json", summary)
    rundir.release(out)
    return summary


def _log_trial(t, budget, log) -> None:
    from optuna.trial import TrialState

    stages = "+".join(m for m, _ in t.user_attrs.get("stages", [])) or "dense"
    if t.state == TrialState.COMPLETE:
        c = t.user_attrs["cost"]
        log(
            f"trial {t.number} ({stages}): quality {t.user_attrs['quality']:.4g}, "
            f"{format_budget({a: c[AXES[a]] for a in budget})}{'' if t.user_attrs.get('feasible') else ' (over)'}"
        )
    else:
        log(f"trial {t.number} ({stages}): {t.state.name.lower()} ({t.user_attrs.get('reason', '')})")

