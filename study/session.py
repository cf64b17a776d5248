"""One worker's side of a study: the dense model in memory, the search space, and the trial objective.

Each trial samples which stages run and their knobs (retrofit/search_space.py), predicts the cost from the
settings (each stage spending its whole allowance) and prunes the trial without fitting when even that is over
budget; otherwise it fits and applies the stages to a fresh copy of the dense model (loaded once per worker),
computes the cost from what the stages chose (search/cost.py) and the quality (continuation perplexity on a
few windows). Stage results are memoised by their settings and those of the stages before them, so a trial that
shares a prefix with a recent one re-applies the plans instead of fitting again.
"""

from __future__ import annotations

import collections
import copy
import gc
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

from adaflex.retrofit import registry
from adaflex.retrofit.contribution import probe_quality, quality_source
from adaflex.retrofit.errors import AdaflexError, UsageError
from adaflex.retrofit.recipe import Recipe, validate
from adaflex.retrofit.search_space import SearchSection, build
from adaflex.retrofit.stage import StageContext
from adaflex.search.cost import cost, feasible, format_budget, violations
from adaflex.search.space import corner_points

from .cost import setting_of
from .storage import WORKER

RESULT_ATTRS = ("cost", "cost_source", "measured", "quality", "constraints", "feasible", "stage_metrics")
MEMO_SIZE = 12  # stage results kept per worker (stages re-applied from their plan when settings repeat)


class Surplus(Exception):
    """A trial started past the study's total (see Session.objective)."""


class Session:
    """One worker: the dense model in memory, the search space and the trial objective."""

    def __init__(
        self,
        recipe: Recipe,
        raw: dict,
        model,
        tok,
        model_name: str,
        budget: dict[str, float],
        pareto: bool,
        out: Path,
        log,
        data=None,
    ):
        from adaflex.retrofit.arch import reference_of, search_shape
        from adaflex.retrofit.evaluate import probe_ids
        from adaflex.retrofit.sources import run_data

        self.recipe, self.raw, self.model_name, self.budget, self.pareto = recipe, raw, model_name, budget, pareto
        self.out, self.log = out, log
        self.total: int | None = None  # the study's trial count (set by search())
        self.sec = recipe.search or SearchSection()
        reference_of(model)
        self.pristine, self.tok = model, tok
        self.shape = search_shape(model, float(next(model.parameters()).element_size()))
        self.spaces = build(recipe, self.shape.num_layers)
        if not self.spaces:
            raise UsageError("recipe: stages: nothing to search (no stage, and no search.stages)")
        qpath, qlayout, self.context, self.continuation, self.windows = quality_source(recipe)
        # the dense model writes any generated text now, before a trial changes it; every trial shares the data
        self.data = run_data(recipe, data).bind(model, tok, log)
        self.qtext = self.data.text(qpath, qlayout, "search.quality.data")
        self.ref_context = self.sec.context or self.context
        cal = recipe.data.calibration
        self.probe = probe_ids(tok, self.data.text(cal.path, cal.layout) if cal is not None else self.qtext)
        self.memo: collections.OrderedDict = collections.OrderedDict()
        self.current: int | None = None
        self.ran = 0

    # -- settings --

    def sample(self, trial) -> list[tuple[str, dict]]:
        stages = []
        for sp in self.spaces:
            on = sp.fixed_on or sp.knobs["enabled"].suggest(trial, f"{sp.method}.enabled")
            if not on:
                continue
            values = {k: kn.suggest(trial, f"{sp.method}.{k}") for k, kn in sp.knobs.items() if k != "enabled"}
            stages.append((sp.method, sp.settings(values)))
        return stages

    def trial_recipe(self, stages: list[tuple[str, dict]]) -> Recipe:
        raw = {k: v for k, v in self.raw.items() if k != "search"}
        raw["stages"] = [{m: s} for m, s in stages]
        raw["budget"] = dict(self.budget)
        return validate(raw, "trial")

    def predict(self, recipe: Recipe):
        items = [(m, c, None, {}) for m, c in recipe.stage_items()]
        return cost(
            self.shape,
            setting_of(items, self.shape, self.ref_context, self.sec.sparse_kernel, self.shape.bytes_per_value),
            self.ref_context,
        )

    def cheapest(self):
        """The lowest predicted cost over the corners of the space (None when there are too many corners)."""
        from adaflex.search.space import Knob

        knobs = {f"{sp.method}.{k}": kn for sp in self.spaces for k, kn in sp.knobs.items()}
        points = corner_points(knobs or {"_": Knob(choices=(0,))})
        if points is None:
            return None
        best, best_key = None, None
        for p in points:
            stages = []
            for sp in self.spaces:
                if not (sp.fixed_on or p.get(f"{sp.method}.enabled")):
                    continue
                stages.append((sp.method, sp.settings({k: p[f"{sp.method}.{k}"] for k in sp.knobs})))
            try:
                c = self.predict(self.trial_recipe(stages))
            except (UsageError, ValueError):
                continue
            key = max(v / self.budget[a] for a, v in zip(self.budget, [c.axis(a) for a in self.budget]))
            if best is None or key < best_key:
                best, best_key = c, key
        return best

    # -- running the stages --

    def apply_stages(self, model, recipe: Recipe, tmp: Path) -> list:
        from adaflex.retrofit.stage import StageResult

        done, prefix = [], []
        for i, (method, cfg) in enumerate(recipe.stage_items()):
            impl = registry.get(method)
            prefix.append([method, cfg.model_dump(mode="json")])
            key = json.dumps(prefix, sort_keys=True)
            res: StageResult | None = self.memo.get(key)
            if res is None:
                impl.check(model, cfg, f"trial: stages.{i}.{method}")
                # a method whose fit checks what it finds in its state folder (prune's distortion curves)
                # keeps it under the upstream stages' key, shared by trials; others work in the trial's folder
                if impl.reuses_state:
                    state = self.out / "cache" / hashlib.sha256(json.dumps(prefix[:-1]).encode()).hexdigest()[:12]
                else:
                    state = tmp / f"stage-{i}"
                res = impl.fit(StageContext(model, self.tok, recipe, i, state, self.data), cfg)
                res.plan = impl.read_plan(res.plan, f"trial: stages.{i}.{method}: the fitted plan")
                self.memo[key] = res
                while len(self.memo) > MEMO_SIZE:
                    self.memo.popitem(last=False)
            else:
                self.memo.move_to_end(key)
            impl.apply(model, res.plan, res.tensors)
            done.append((method, cfg, res.plan, res.metrics))
        return done

    def evaluate_dense(self) -> float:
        return probe_quality(self.pristine, self.tok, self.qtext, self.context, self.continuation, self.windows)

    def scored(self, model, done: list):
        """A fitted trial model's cost by the plans (the cost model), its measured cost figures and its quality."""
        from adaflex.retrofit.evaluate import cost_figures

        setting = setting_of(done, self.shape, self.ref_context, self.sec.sparse_kernel, self.shape.bytes_per_value)
        quality = probe_quality(model, self.tok, self.qtext, self.context, self.continuation, self.windows)
        return cost(self.shape, setting, self.ref_context), cost_figures(model, self.probe), quality

    def objective(self, trial):
        import optuna

        self.current = trial.number
        trial.set_user_attr("worker", WORKER)
        if self.total is not None:
            # the storage numbers trials atomically: one numbered after `total` live trials was started by a
            # worker that checked the count at the same moment as another (the last trial twice); it fails
            # at once, with a reason, and is not counted
            before = [t for t in trial.study.get_trials(deepcopy=False)
                      if t.number < trial.number and t.state != optuna.trial.TrialState.FAIL]
            if len(before) >= self.total:
                trial.set_user_attr("reason", "surplus: the study had its trials when this one started")
                raise Surplus(f"trial {trial.number}: surplus")
        stages = self.sample(trial)
        trial.set_user_attr("stages", [[m, s] for m, s in stages])
        k = len(self.budget)
        # TPE proposes a finished configuration again on small discrete spaces: answer from that trial
        done = self.finished_with(trial)
        if done is not None:
            for key in RESULT_ATTRS:
                if key in done.user_attrs:
                    trial.set_user_attr(key, done.user_attrs[key])
            trial.set_user_attr("duplicate_of", done.number)
            return done.values if self.pareto else done.value

        def reject(kind: str, why: str, c=None):
            trial.set_user_attr("reason", f"{kind}: {why}")
            trial.set_user_attr("constraints", violations(c, self.budget) if c is not None else [1.0] * k)
            if c is not None:
                trial.set_user_attr("cost", c.to_dict())
                trial.set_user_attr("cost_source", "predicted")
            raise optuna.TrialPruned(f"{kind}: {why}")

        try:
            rec = self.trial_recipe(stages)
            pred = self.predict(rec)
        except (UsageError, ValueError) as e:
            reject("invalid", str(e))
        # the study's first trials (the recipe as written, each method alone) run whatever they cost: they are
        # the reference points of the Pareto plot
        if not feasible(pred, self.budget) and not trial.user_attrs.get("start"):
            reject("over budget", f"predicted {format_budget({a: pred.axis(a) for a in self.budget})}", pred)
        tmp = self.out / "tmp" / f"trial-{trial.number}-{os.getpid()}"
        model = copy.deepcopy(self.pristine)
        try:
            try:
                done = self.apply_stages(model, rec, tmp)
            except (AdaflexError, ValueError) as e:
                reject("invalid", str(e).splitlines()[0])
            c, measured, q = self.scored(model, done)
        finally:
            del model
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()
        if not math.isfinite(q):
            q = 1e12  # a destroyed model is a bad trial, not a failed one
        trial.set_user_attr("cost", c.to_dict())
        trial.set_user_attr("cost_source", "plans")
        trial.set_user_attr("measured", measured)
        trial.set_user_attr("quality", q)
        trial.set_user_attr("constraints", violations(c, self.budget))
        trial.set_user_attr("feasible", feasible(c, self.budget))
        trial.set_user_attr("stage_metrics", [{"method": m, **_small(met)} for m, _, _, met in done])
        if self.pareto:
            return (q, *[c.axis(a) for a in self.budget])
        return q

    def finished_with(self, trial):
        """A complete trial of this study with the same settings (stages as sampled), or None."""
        from optuna.trial import TrialState

        key = json.dumps(trial.user_attrs["stages"], sort_keys=True)
        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number != trial.number and json.dumps(t.user_attrs.get("stages"), sort_keys=True) == key:
                return t
        return None

    def enqueue_start(self, study) -> None:
        """A new study starts with the recipe as written, then each method alone (the single-method points)."""
        if study.get_trials(deepcopy=False) or not self.sec.single_methods:
            return
        searchable = [sp for sp in self.spaces if "enabled" in sp.knobs]

        def params(on: set[str]) -> dict:
            p = {}
            for sp in self.spaces:
                if "enabled" in sp.knobs:
                    p[f"{sp.method}.enabled"] = sp.method in on
                if sp.method not in on and not sp.fixed_on:
                    continue
                cfg = registry.config_class(sp.method).model_validate(sp.base)
                for k, kn in sp.knobs.items():
                    if k != "enabled":
                        p[f"{sp.method}.{k}"] = kn.clip(getattr(cfg, k))
            return p

        everything = {sp.method for sp in self.spaces}
        study.enqueue_trial(params(everything), user_attrs={"start": True}, skip_if_exists=True)
        if len(self.spaces) > 1:
            for sp in searchable:
                study.enqueue_trial(params({sp.method}), user_attrs={"start": True}, skip_if_exists=True)


def _small(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}

