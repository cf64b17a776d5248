"""`adaflex retrofit`: apply a recipe's stages to a model and report dense vs retrofitted side by side.

The run directory (README.md, "Run directory") doubles as the progress state: each finished evaluation and stage is
written atomically under `state/`, so rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from . import checks, io, models, registry, restore, rundir
from .arch import reference_of
from .contribution import Contributions
from .errors import UsageError
from .evaluate import cost_figures, probe_ids, run_eval
from .recipe import Recipe, validate
from .sources import RunData, run_data
from .stage import StageContext, StageResult
from .state import state_of

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. " * 64


def preflight(recipe: Recipe, data: RunData | None = None) -> RunData:
    """Read every data source the recipe names before anything is loaded or written (layout errors first); the
    returned RunData serves them to the rest of the run. Generated text waits for the model (RunData.bind)."""
    return run_data(recipe, data).preflight()


def evaluate_recipe(model, tok, recipe: Recipe, state: Path, tag: str, log, data: RunData | None = None) -> list[dict]:
    """The recipe's `eval:` on `model`, each result kept as STATE/TAG-eval-i.json (a rerun reuses it). A fidelity
    evaluation keeps the dense model's top-k as STATE/fidelity-i.safetensors: the retrofitted run compares to it."""
    data = data or RunData(recipe).bind(model, tok)
    results = []
    for i, ev in enumerate(recipe.eval):
        f = state / f"{tag}-eval-{i}.json"
        if f.is_file():
            results.append(json.loads(f.read_text()))
            continue
        log(f"{tag}: {ev.label()}")
        res = run_eval(model, tok, ev.task, ev.data, layout=ev.layout, limit=ev.limit, seq_len=ev.seq_len,
                       stride=ev.stride, context=ev.context, continuation=ev.continuation,
                       batch_size=ev.batch_size, label=f"{tag} {ev.label()}",
                       source=data.get(ev.data, ev.layout, f"eval.{i}.data"),
                       reference=state / f"fidelity-{i}.safetensors" if ev.task == "fidelity" else None)
        res["name"] = ev.label()
        io.write_json(f, res)
        results.append(res)
    return results


def _probe(recipe: Recipe, tok, data: RunData) -> torch.Tensor:
    cal = recipe.data.calibration
    text = data.text(cal.path, cal.layout, "data.calibration.path") if cal is not None else PROBE_TEXT
    return probe_ids(tok, text)


def run(recipe: Recipe | dict | str | Path | None = None, model=None, tokenizer=None, *, model_name: str | None = None,
        out: str | Path | None = None, log=None, allow_bin: bool = False, data: RunData | None = None) -> dict:
    """Python API of `adaflex retrofit`: returns the report; writes the run directory when `out` is given.

    `model` may be a loaded model (with `tokenizer`) or a MODEL spec; the recipe's `model` is the fallback.
    `data`: sources already resolved by the caller (the CLI's --eval), shared instead of read again.
    """
    log = log or (lambda msg: print(f"adaflex: {msg}", file=sys.stderr))
    if recipe is None or isinstance(recipe, (str, Path)):
        from .recipe import load_recipe

        recipe = load_recipe(recipe)
    recipe = validate(recipe)
    checks.stage_order(recipe, "recipe")  # the API refuses what `adaflex recipe validate` does, before the load
    torch.manual_seed(recipe.seed)
    data = preflight(recipe, data)
    if out is not None:  # before the model loads, so that a second writer is refused at once
        rundir.hold(out)
    try:
        model, tokenizer, model_name = _model_checked(recipe, model, tokenizer, model_name, allow_bin)
    except BaseException:
        if out is not None:  # a refused run leaves no folder of its own behind (only an empty one is removed)
            rundir.release(out)
        raise
    resolved = recipe.to_dict()
    if model_name:
        resolved["model"] = model_name
    run_dir = Path(out) if out is not None else None
    state = _open_run_dir(run_dir, resolved)
    data.bind(model, tokenizer, log)  # generated text is written by the dense model, before any stage changes it
    if run_dir is not None:
        rundir.record_inputs(run_dir, resolved, model_name, data.inputs())

    reference_of(model)
    probe = _probe(recipe, tokenizer, data)
    dense_cost = cost_figures(model, probe)
    dense = evaluate_recipe(model, tokenizer, recipe, state, "dense", log, data)

    # a composed recipe reports each stage's contribution: quality and cost after every stage
    contrib = Contributions(recipe, tokenizer, probe, data) if len(recipe.stages) > 1 else None
    after = []
    if contrib:  # the dense cost is already measured above
        after.append(_measured(state / "dense-after.json", lambda: contrib.measure(model, "dense", dense_cost)))

    stages, all_tensors = [], {}
    for i, (method, cfg) in enumerate(recipe.stage_items()):
        f = state / f"stage-{i}.json"
        tf = state / f"stage-{i}.safetensors"
        impl = registry.get(method)
        if f.is_file():
            done = json.loads(f.read_text())
            result = StageResult(impl.read_plan(done.get("plan"), f"{f}: plan"),
                                 load_file(str(tf)) if tf.is_file() else {}, done.get("metrics", {}))
            log(f"stage {i} ({method}): resumed from {f}")
        else:
            log(f"stage {i} ({method}): fitting")
            ctx = StageContext(model, tokenizer, recipe, i, state / f"stage-{i}", data)
            result = impl.fit(ctx, cfg)
            result.plan = impl.read_plan(result.plan, f"stages.{i}.{method}: the fitted plan")
            if result.tensors:
                io.save_tensors(tf, result.tensors)
            io.write_json(f, {"method": method, "plan": result.plan.dump(), "metrics": result.metrics})
        impl.apply(model, result.plan, result.tensors)
        stages.append({"method": method, "plan": result.plan.dump(), "metrics": result.metrics})
        if contrib:
            after.append(_measured(state / f"stage-{i}-after.json", lambda m=method: contrib.measure(model, m)))
        all_tensors.update({restore.stage_prefix(i, method) + k: v for k, v in result.tensors.items()})

    retro_cost = cost_figures(model, probe)
    retro = evaluate_recipe(model, tokenizer, recipe, state, "retrofitted", log, data)
    plan = {"adaflex_version": rundir.version(), "model": resolved.get("model"), "recipe_sha256": recipe.sha256(),
            "dense_reference": reference_of(model), "stages": stages}
    report = _report(resolved, plan, dense_cost, retro_cost, dense, retro)
    if after:
        report["after_each_stage"] = after
    if run_dir is not None:
        io.save_tensors(run_dir / "adaflex.safetensors", all_tensors, _metadata(plan))
        io.write_json(run_dir / "plan.json", plan)
        io.write_json(run_dir / "report.json", report)
        report["run_dir"] = str(run_dir)
    state_of(model).plan = plan
    if run_dir is not None:
        rundir.release(run_dir)
    return report


def _model_checked(recipe: Recipe, model, tokenizer, model_name: str | None, allow_bin: bool):
    """The model loaded (or the one given) with every model-dependent setting checked, before anything is written."""
    if model is None or isinstance(model, (str, Path)):
        model_name = str(model) if model is not None else (recipe.model or models.DEFAULT_MODEL)
        model, tokenizer = restore.load(model_name, allow_bin=allow_bin)
    elif tokenizer is None:
        raise UsageError("run(): a loaded model needs its tokenizer")
    for i, (method, cfg) in enumerate(recipe.stage_items()):
        impl = registry.get(method)
        if impl.needs_calibration(cfg) and recipe.data.calibration is None:
            raise UsageError(f"recipe: data.calibration: required by stages.{i}.{method}")
        impl.check(model, cfg, f"recipe: stages.{i}.{method}")
    return model, tokenizer, model_name


def _measured(path: Path, measure) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    res = measure()
    io.write_json(path, res)
    return res


def _metadata(plan: dict) -> dict[str, str]:
    return {"format": "pt", "adaflex.version": plan["adaflex_version"], "adaflex.recipe_sha256": plan["recipe_sha256"],
            "adaflex.base_model": str(plan.get("model"))}


def _report(recipe: dict, plan: dict, dense_cost: dict, retro_cost: dict, dense: list, retro: list) -> dict:
    evals = []
    for d, r in zip(dense, retro, strict=True):
        row = {"name": d["name"], "task": d["task"], "metric": d["metric"], "dense": d, "retrofitted": r,
               "ratio": r["value"] / d["value"] if d["value"] else None}
        evals.append(row)
    head = retro[0] if retro else {"task": None, "metric": None, "value": None, "n": 0}
    report = {"task": head["task"], "metric": head["metric"], "value": head["value"], "n": head["n"],
              **{k: retro_cost[k] for k in retro_cost}, "tokens_per_s": head.get("tokens_per_s"),
              # the first evaluation's cache at its own length (each eval in `evals` carries its own)
              **{k: head[k] for k in ("kv_context", "kv_bytes_at_context", "kv_bytes_ratio_at_context") if k in head},
              "model": recipe.get("model"), "recipe_sha256": plan["recipe_sha256"],
              "stages": [{"method": s["method"], **s["metrics"]} for s in plan["stages"]],
              "dense": {**dense_cost, **({"value": dense[0]["value"]} if dense else {})},
              "retrofitted": {**retro_cost, **({"value": head["value"]} if retro else {})},
              "evals": evals}
    return report


def _open_run_dir(run_dir: Path | None, resolved: dict) -> Path | None:
    """Create or resume a run directory; refuse one that holds a run of another recipe."""
    if run_dir is None:
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="adaflex-run-"))
        import atexit

        atexit.register(shutil.rmtree, tmp, True)
        return tmp
    recipe_file = run_dir / "recipe.yaml"
    text = yaml.safe_dump(resolved, sort_keys=False)
    if recipe_file.is_file():
        if yaml.safe_load(recipe_file.read_text()) != resolved:
            raise UsageError(f"{run_dir}: holds a run of another recipe or model; choose another --out")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir}: exists and is not an adaflex run directory; choose another --out")
    io.write_text(recipe_file, text)
    (run_dir / "state").mkdir(exist_ok=True)
    return run_dir / "state"
