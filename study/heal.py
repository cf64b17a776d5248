"""`adaflex search --heal-top K` (recipe `search.heal`): the trials are scored unhealed, as always; then the K
best feasible ones are healed briefly (the `heal` stage appended last, with the recipe's heal settings) and
the search picks by healed quality (ModelOpt's NAS: rank cheap, then train the short list). Healed results
are kept in the study (user attribute `healed`, keyed by trial number and the heal settings), so a
restarted search does not heal a trial twice."""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil

from adaflex.retrofit import registry
from adaflex.retrofit.errors import AdaflexError, UsageError
from adaflex.retrofit.recipe import Recipe
from adaflex.retrofit.search_space import HEAL, SearchSection
from adaflex.search.cost import feasible

from .session import Session


def heal_top_of(recipe: Recipe, heal_top: int | None, n_trials: int) -> int:
    """K: `--heal-top`, else `search.heal.top`, else 0; more than the study's trials is a usage error."""
    sec = (recipe.search or SearchSection()).heal
    k = heal_top if heal_top is not None else (sec.top if sec is not None else 0)
    if k > n_trials:
        where = "--heal-top" if heal_top is not None else "search.heal.top"
        raise UsageError(f"{where} {k}: larger than the search's {n_trials} trials")
    if k:
        cfg = registry.config_class(HEAL).model_validate(heal_settings(recipe))
        if registry.get(HEAL).needs_calibration(cfg) and recipe.data.calibration is None:
            raise UsageError(f"recipe: data.calibration: required by the {HEAL} stage (--heal-top {k})")
    return k


def heal_settings(recipe: Recipe) -> dict:
    """`search.heal.settings`, else the recipe's own heal stage as written, else heal's defaults ({})."""
    sec = (recipe.search or SearchSection()).heal
    if sec is not None and sec.settings is not None:
        return dict(sec.settings)
    for method, cfg in recipe.stage_items():
        if method == HEAL:
            return cfg.model_dump(mode="json", exclude_unset=True)
    return {}


def top_trials(study, k: int) -> list:
    """The k best complete, feasible trials by unhealed quality (a configuration proposed twice counts once)."""
    from optuna.trial import TrialState

    ok = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
          if t.user_attrs.get("feasible") and "duplicate_of" not in t.user_attrs]
    ok.sort(key=lambda t: (t.user_attrs["quality"], t.user_attrs["cost"]["flops_ratio"], t.number))
    return ok[:k]


def heal_top(study, session: Session, k: int, settings: dict, log) -> dict[str, dict]:
    """Heal the k best trials; returns {trial number: healed result} for these settings (resumed ones kept)."""
    key = json.dumps(settings, sort_keys=True)
    held = dict(study.user_attrs.get("healed") or {})
    out = {}
    for t in top_trials(study, k):
        n = str(t.number)
        if n in held and held[n]["settings"] == key:
            out[n] = held[n]
            continue
        stages = [(m, s) for m, s in t.user_attrs["stages"]] + [(HEAL, settings)]
        log(f"trial {t.number}: healing ({'+'.join(m for m, _ in stages)})")
        out[n] = held[n] = _healed(session, stages, t, key)
        study.set_user_attr("healed", held)  # after each one: a restart resumes here
        r = out[n]
        log(f"trial {t.number}: quality {r['unhealed']:.4g} -> {r['quality']:.4g} healed" if r.get("quality")
            else f"trial {t.number}: healing failed ({r['reason']})")
    return out


def _healed(session: Session, stages: list, trial, key: str) -> dict:
    base = {"settings": key, "unhealed": trial.user_attrs["quality"], "stages": [[m, s] for m, s in stages]}
    tmp = session.out / "tmp" / f"heal-{trial.number}-{os.getpid()}"
    model = copy.deepcopy(session.pristine)
    try:
        try:
            done = session.apply_stages(model, session.trial_recipe(stages), tmp)
        except (AdaflexError, ValueError) as e:
            return {**base, "quality": None, "feasible": False, "reason": str(e).splitlines()[0]}
        c, measured, q = session.scored(model, done)
    finally:
        del model
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
    q = q if math.isfinite(q) else 1e12
    metrics = [{k: v for k, v in met.items() if isinstance(v, (int, float, str, bool))} for _, _, _, met in done]
    return {**base, "quality": q, "cost": c.to_dict(), "measured": measured, "feasible": feasible(c, session.budget),
            "stage_metrics": metrics[-1:]}


def best_healed(healed: dict[str, dict]) -> tuple[int, dict] | None:
    """(trial number, result) of the best feasible healed trial by healed quality, or None."""
    ok = [(int(n), r) for n, r in healed.items() if r.get("feasible") and r.get("quality") is not None]
    if not ok:
        return None
    return min(ok, key=lambda nr: (nr[1]["quality"], nr[1]["cost"]["flops_ratio"], nr[0]))
