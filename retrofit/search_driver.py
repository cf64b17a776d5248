"""`adaflex search`: an Optuna study over a recipe's searchable settings, quality under a cost budget.

Each trial samples which stages run and their knobs (retrofit/search_space.py), predicts the cost from the
settings (each stage spending its whole allowance) and prunes the trial without fitting when even that is
over budget; otherwise it fits and applies the stages to a fresh copy of the dense model kept in memory
(the model is loaded once per worker), computes the cost from what the stages chose (search/cost.py) and
the quality (continuation perplexity on a few windows). The budget is a constraint (`constraints_func`),
so the sampler learns where the feasible region is; `--pareto` makes the cost axes objectives as well.

Storage: an SQLite file in the output folder by default; any Optuna RDB URL (PostgreSQL) or a journal file
lets several workers share one study. `--trials N` is the study's total: a worker stops once N trials have
finished, so a restarted worker continues where the study stands. A trial whose worker died is retried:
RDB heartbeats fail it after the grace period (RetryHeartbeatStaleTrialCallback re-enqueues its settings),
and a worker on the same host fails it at once when the owning process is gone (the journal has no
heartbeats). An interrupted trial (Ctrl-C) is re-enqueued before the worker exits with 130.
"""

from __future__ import annotations

import collections
import copy
import csv
import gc
import hashlib
import io as _io
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import yaml

from adaflex.search.cost import AXES, Setting, Shape, cost, feasible, format_budget, pareto_front, violations
from adaflex.search.space import corner_points

from . import io, models, registry
from .contribution import probe_quality, quality_source
from .errors import AdaflexError, BudgetInfeasible, UsageError
from .method import CostState
from .recipe import Recipe, validate
from .search_space import SearchSection, build
from .stage import StageContext

WORKER = {"host": socket.gethostname(), "pid": os.getpid()}
RESULT_ATTRS = ("cost", "cost_source", "measured", "quality", "constraints", "feasible", "stage_metrics")
MEMO_SIZE = 12  # stage results kept per worker (stages re-applied from their plan when settings repeat)


# ---- storage ----


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def journal_path(url: str) -> str | None:
    if url.startswith("journal:"):
        return url.removeprefix("journal:")
    if "://" not in url and url.endswith((".log", ".journal")):
        return url
    return None


def open_storage(url: str | None, out: Path, heartbeat: int):
    """(storage, printable URL). Journal files have no heartbeats; RDB storages retry stale trials."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url is None:
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    jpath = journal_path(url)
    if jpath is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(jpath).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(Path(jpath).expanduser()))), f"journal:{jpath}"
    if "://" not in url:
        raise UsageError(
            f"--storage {url}: neither an RDB URL (postgresql://..., sqlite:///...) nor a journal file "
            "(journal:PATH or a path ending .log)"
        )
    import sqlalchemy.exc

    def connect():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                failed_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )

    try:
        for attempt in range(5):
            try:
                storage = connect()
                break
            except sqlalchemy.exc.IntegrityError:
                # workers started together on an empty database race to create Optuna's tables: the loser
                # sees a duplicate key; the tables exist a moment later
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except ImportError as e:
        raise UsageError(
            f"--storage {_redact(url)}: missing database driver ({e}; e.g. pip install psycopg2-binary)"
        ) from None
    except sqlalchemy.exc.ArgumentError as e:
        raise UsageError(f"--storage {_redact(url)}: invalid URL ({str(e).splitlines()[0]})") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise AdaflexError(f"--storage {_redact(url)}: cannot open ({str(e).splitlines()[0][:200]})") from None
    return storage, _redact(url)


# ---- cost of a list of stages ----


def setting_of(
    stages: list[tuple[str, object, dict | None, dict]],
    shape: Shape,
    context: int,
    sparse_kernel: bool = False,
    model_bytes: float = 4.0,
) -> Setting:
    """The cost-model setting of stages in order: (method, config, plan or None, metrics). Each method's
    `cost` rule updates the state; without a plan a stage is predicted from its settings, spending its
    whole allowance."""
    state = CostState(shape=shape, context=context, model_bytes=model_bytes)
    for method, cfg, plan, metrics in stages:
        registry.get(method).cost(cfg, plan, metrics, state)
    return state.setting(sparse_kernel)


# ---- the study ----


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Surplus(Exception):
    """A trial started past the study's total (see Session.objective)."""


def retry(study, frozen) -> None:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, frozen)


def recover_dead_local(study, log) -> int:
    """Fail and re-enqueue RUNNING trials of processes on this host that are gone (a SIGKILLed worker)."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        if w.get("host") == WORKER["host"] and w.get("pid") != WORKER["pid"] and not _alive(int(w.get("pid", 0))):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except Exception:  # another worker got there first
                continue
            retry(study, study.trials[t.number])
            log(f"trial {t.number}: its worker (pid {w.get('pid')}) is gone; failed and re-enqueued")
            n += 1
    return n


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
    ):
        from .data import read_text
        from .evaluate import probe_ids, reference_of

        self.recipe, self.raw, self.model_name, self.budget, self.pareto = recipe, raw, model_name, budget, pareto
        self.out, self.log = out, log
        self.total: int | None = None  # the study's trial count (set by search())
        self.sec = recipe.search or SearchSection()
        reference_of(model)
        self.pristine, self.tok = model, tok
        self.shape = Shape.from_config(model.config, float(next(model.parameters()).element_size()))
        self.spaces = build(recipe, self.shape.num_layers)
        if not self.spaces:
            raise UsageError("recipe: stages: nothing to search (no stage, and no search.stages)")
        qpath, qlayout, self.context, self.continuation, self.windows = quality_source(recipe)
        self.qtext = read_text(qpath, qlayout)
        self.ref_context = self.sec.context or self.context
        cal = recipe.data.calibration
        self.probe = probe_ids(tok, read_text(cal.path, cal.layout) if cal is not None else self.qtext)
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
        from .stage import StageResult

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
                res = impl.fit(StageContext(model, self.tok, recipe, i, state), cfg)
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

    def objective(self, trial):
        import optuna

        from .evaluate import cost_figures

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
            c = cost(
                self.shape,
                setting_of(done, self.shape, self.ref_context, self.sec.sparse_kernel, self.shape.bytes_per_value),
                self.ref_context,
            )
            measured = cost_figures(model, self.probe)
            q = probe_quality(model, self.tok, self.qtext, self.context, self.continuation, self.windows)
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
) -> dict:
    """Run (or continue) a study; returns the summary that `--format json` prints. `evaluate`: afterwards,
    hold dense, the best trial and the best single-method trial to the recipe's `eval:` side by side."""
    import optuna
    from optuna.trial import TrialState

    log = log or (lambda msg: print(f"adaflex: {msg}", file=sys.stderr))
    _suppress_optuna_noise()
    from .pipeline import preflight

    preflight(recipe)
    if evaluate and not recipe.eval:  # refused before the search, not after it
        raise UsageError("--evaluate: the recipe has no `eval:` section")
    model_name = str(model_spec or recipe.model or models.DEFAULT_MODEL)
    n_trials = trials or (recipe.search or SearchSection()).trials
    name = study_name or default_study_name(recipe, model_name, budget, pareto)
    out = Path(out) if out is not None else Path("runs") / name
    if storage is not None and journal_path(storage) is None and "://" not in storage:
        open_storage(storage, out, heartbeat)  # raises the usage error before anything is loaded
    for sp in build(recipe, 64):  # checks that need no model (the block count only bounds default knobs)
        cfg = registry.config_class(sp.method).model_validate(sp.base)
        if registry.get(sp.method).needs_calibration(cfg) and recipe.data.calibration is None:
            raise UsageError(f"recipe: data.calibration: required by the {sp.method} stage")
    model, tok = models.load(model_spec or recipe.model)
    raw = {**raw, "model": model_name}
    session = Session(recipe, raw, model, tok, model_name, budget, pareto, out, log)
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
    bar = _Bar(n_trials, show_progress)
    try:
        with bar:
            while True:
                recover_dead_local(study, log)
                if isinstance(st, optuna.storages.RDBStorage):
                    optuna.storages.fail_stale_trials(study)
                ts = study.get_trials(deepcopy=False)
                finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ts)
                bar.update(finished)
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
    summary = finish(study, session, budget, pareto, n_trials, name, label, out)
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
    return summary


def evaluate_best(study, session: Session, summary: dict, out: Path, log) -> list[dict]:
    """The recipe's `eval:` on dense, the best trial and the best single-method trial, each model rebuilt from
    the trial's settings in memory (stage results memoised by the study are reused). Results are kept per
    model and eval under OUT/eval/, so an interrupted evaluation resumes."""
    from .pipeline import evaluate_recipe

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
            results = evaluate_recipe(model, session.tok, session.recipe, state, tag, log)
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


class _Bar:
    """A rich progress bar over the study's finished trials (stderr; quiet unless progress is enabled)."""

    def __init__(self, total: int, show: bool | None):
        from .progress import _enabled

        self.total, self.show = total, _enabled() if show is None else show
        self.progress = None

    def __enter__(self):
        if self.show:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("search"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("search", total=self.total)
        return self

    def update(self, finished: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=min(finished, self.total))

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


# ---- outputs ----


def trial_rows(study, budget: dict) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        c = a.get("cost") or {}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "worker": "{host}:{pid}".format(**a["worker"]) if "worker" in a else "",
                "stages": "+".join(m for m, _ in a.get("stages", [])) or "dense",
                "quality": a.get("quality"),
                "feasible": a.get("feasible"),
                **{AXES[x]: c.get(AXES[x]) for x in AXES},
                "sparsity": c.get("sparsity"),
                "executed": c.get("executed"),
                "cost_source": a.get("cost_source", ""),
                "reason": a.get("reason", ""),
                "params": json.dumps(t.params, sort_keys=True, default=str),
                "settings": a.get("stages", []),
                "retry_of": t.system_attrs.get("failed_trial"),
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = [k for k in rows[0] if k != "settings"] if rows else ["number"]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    io.write_text(path, buf.getvalue())


def plot(path: Path, rows: list[dict], dense_q: float | None, budget: dict, axis: str, front: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = AXES[axis]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get(key) is not None]
    for feas, color, label in ((False, "#bbbbbb", "over budget"), (True, "#4c72b0", "within budget")):
        pts = [r for r in done if bool(r["feasible"]) == feas and "+" in r["stages"]]
        if pts:
            ax.scatter([r[key] for r in pts], [r["quality"] for r in pts], c=color, s=22, label=f"composed, {label}")
    markers = "vsP^D<>hX*"  # one per method, in registry order
    for i, m in enumerate(registry.METHODS):
        mk = markers[i % len(markers)]
        pts = [r for r in done if r["stages"] == m]
        if pts:
            ax.scatter(
                [r[key] for r in pts],
                [r["quality"] for r in pts],
                marker=mk,
                s=60,
                edgecolors="black",
                label=f"{m} alone",
            )
    if front:
        fr = sorted(front, key=lambda r: r[key])
        ax.step(
            [r[key] for r in fr],
            [r["quality"] for r in fr],
            where="post",
            color="#dd8452",
            marker="o",
            markersize=10,
            markerfacecolor="none",
            label="Pareto front (within budget)",
        )
    if dense_q is not None:
        ax.scatter([1.0], [dense_q], marker="*", s=200, c="gold", edgecolors="black", label="dense", zorder=5)
    ax.axvline(budget[axis], color="red", ls="--", lw=1, label=f"budget {axis}={budget[axis]:g}")
    qs = [r["quality"] for r in done] + ([dense_q] if dense_q else [])
    if qs and max(qs) / max(min(qs), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(f"{key} (vs dense)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("adaflex search: quality vs cost")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with io.atomic_path(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def best_recipe(raw: dict, settings: list, budget: dict, header: str) -> str:
    rec = {k: v for k, v in raw.items() if k not in ("search", "stages", "budget")}
    out = {}
    for k in ("model", "seed", "data"):
        if k in rec:
            out[k] = rec.pop(k)
    out["budget"] = dict(budget)
    out["stages"] = [{m: s} for m, s in settings]
    out.update(rec)
    validate(out, "best.yaml")
    return header + yaml.safe_dump(out, sort_keys=False)


def finish(
    study, session: Session, budget: dict, pareto: bool, n_trials: int, name: str, label: str, out: Path
) -> dict:
    rows = trial_rows(study, budget)
    states = collections.Counter(r["state"] for r in rows)
    ok = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    axes = list(budget)
    front_idx = pareto_front([(r["quality"], *[r[AXES[a]] for a in axes]) for r in ok])
    front = [ok[i] for i in front_idx]
    best = min(ok, key=lambda r: (r["quality"], r[AXES[axes[0]]])) if ok else None
    dense_q = study.user_attrs.get("dense_quality")
    write_csv(out / "trials.csv", rows)
    plot(out / "pareto.png", rows, dense_q, budget, axes[0], front)
    summary = {
        "study": name,
        "storage": label,
        "out": str(out),
        "budget": budget,
        "pareto_mode": pareto,
        "quality_metric": "perplexity",
        "quality_protocol": {
            "context": session.context,
            "continuation": session.continuation,
            "windows": session.windows,
            "reference_context": session.ref_context,
        },
        "dense": {"quality": dense_q, **{AXES[a]: 1.0 for a in AXES}},
        "trials": {
            "requested": n_trials,
            "total": len(rows),
            "complete": states["COMPLETE"],
            "pruned": states["PRUNED"],
            "failed": states["FAIL"],
            "running": states["RUNNING"],
            "waiting": states["WAITING"],
            "feasible": len(ok),
            "this_worker": session.ran,
        },
        "pareto_front": [r["number"] for r in front],
        "best": None,
        "recipe": None,
        "best_single": None,
        "table": sorted(ok, key=lambda r: r["quality"])[:10],
    }
    if best is not None:
        t = study.trials[best["number"]]
        a = t.user_attrs
        summary["best"] = {
            "trial": t.number,
            "config": [{m: st} for m, st in a["stages"]],
            "stages": a["stages"],
            "params": t.params,
            "quality": {"metric": "perplexity", "value": a["quality"]},
            "cost": a["cost"],
            "flops_ratio": a["cost"]["flops_ratio"],
            "measured": a["measured"],
            "stage_metrics": a.get("stage_metrics", []),
        }
        header = (
            f"# adaflex search: best of study {name} under budget {format_budget(budget)} (trial {t.number})\n"
            f"# quality (continuation perplexity, {session.windows} windows): {a['quality']:.4g}; "
            f"flops_ratio {a['cost']['flops_ratio']:.4f}, kv_ratio {a['cost']['kv_ratio']:.4f}, "
            f"params_ratio {a['cost']['params_ratio']:.5f}\n"
        )
        io.write_text(out / "best.yaml", best_recipe(session.raw, a["stages"], budget, header))
        summary["recipe"] = str(out / "best.yaml")
        # the benchmark's reference: the best single-method trial at the same or lower cost on every axis
        single = [
            r
            for r in ok
            if "+" not in r["stages"]
            and r["stages"] != "dense"
            and all(r[AXES[x]] <= best[AXES[x]] + 1e-12 for x in axes)
        ]
        if single:
            s = min(single, key=lambda r: r["quality"])
            ts = study.trials[s["number"]]
            head = (
                f"# adaflex search: best single-method trial of study {name} at the cost of trial {t.number} or "
                f"lower (trial {ts.number}); quality {s['quality']:.4g}, flops_ratio {s['flops_ratio']:.4f}\n"
            )
            io.write_text(out / "best-single.yaml", best_recipe(session.raw, ts.user_attrs["stages"], budget, head))
            summary["best_single"] = {
                "trial": ts.number,
                "stages": ts.user_attrs["stages"],
                "quality": {"metric": "perplexity", "value": s["quality"]},
                "cost": ts.user_attrs["cost"],
                "recipe": str(out / "best-single.yaml"),
            }
    else:
        costed = [r for r in rows if r.get(AXES[axes[0]]) is not None]
        parts = []
        for ax_ in axes:
            key = AXES[ax_]
            cand = [r for r in costed if r.get(key) is not None]
            if cand:
                r = min(cand, key=lambda r: r[key])
                parts.append(
                    f"{key} {r[key]:.4f} (trial {r['number']}"
                    f"{', predicted' if r['cost_source'] == 'predicted' else ''})"
                )
        summary["infeasible"] = (
            f"--budget {format_budget(budget)}: no configuration met it in {len(rows)} trials; "
            f"cheapest found: {', '.join(parts) or 'none costed'}"
        )
    io.write_json(out / "search.json", summary)
    return summary
