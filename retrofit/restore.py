"""Restore any MODEL with its adaptive parts: `adaflex.retrofit.load` and every command that takes a MODEL come here.

A run directory (plan.json + recipe.yaml) is its base model with the plan's stages applied again; an export
(config.json with an `adaflex` block) is its dense weights with the stages that are not baked into them; anything
else (an embedded name, a plain directory, a hub id) is a plain transformers load (models.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors.torch import load_file

from . import models, registry, rundir
from .errors import UsageError, naming
from .method import Method
from .plan import Plan
from .state import state_of


def load(spec: str | Path | None = None, *, allow_bin: bool = False, dtype=None):
    """Any MODEL the CLI accepts → (model, tokenizer), adaptive parts restored for exports and runs."""
    path = Path(str(spec)) if spec is not None and str(spec) not in models.EMBEDDED else None
    if path is not None and path.is_dir() and models.is_run_dir(path):
        return load_run(path, allow_bin=allow_bin, dtype=dtype)
    if path is not None and path.is_dir() and models.is_export_dir(path):
        return load_export(path, dtype=dtype)
    return models.load_base(spec, allow_bin=allow_bin, dtype=dtype)


def stage_prefix(i: int, method: str) -> str:
    """Where stage i's tensors live among a run's (or an export's) adaflex tensors."""
    return f"stages.{i}.{method}."


def split_tensors(all_tensors: dict, i: int, method: str) -> dict:
    p = stage_prefix(i, method)
    return {k[len(p):]: v for k, v in all_tensors.items() if k.startswith(p)}


def read_stages(stages, where: str, key: str = "stages") -> list[tuple[Method, Plan]]:
    """Stored stage entries (plan.json's `stages`, an export's `adaflex.stages`) as (method, typed plan), every
    plan validated before anything is applied; a bad entry is a UsageError naming `where` and the key."""
    if not isinstance(stages, list):
        raise UsageError(f"{where}: {key}: expected a list of stages")
    out = []
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or not isinstance(st.get("method"), str):
            raise UsageError(f"{where}: {key}.{i}.method: missing")
        try:
            method = registry.get(st["method"])
        except UsageError as e:
            raise UsageError(f"{where}: {key}.{i}.method: {e}") from None
        out.append((method, method.read_plan(st.get("plan"), f"{where}: {key}.{i}.plan")))
    return out


def apply_plan(model, plan: dict, tensors: dict, only_runtime: bool = False, where: str = "plan",
               key: str = "stages") -> None:
    """Re-apply stored stages; exports skip the ones whose effect is already baked into the weights."""
    typed = read_stages(plan.get("stages"), where, key)
    for i, (st, (method, stage_plan)) in enumerate(zip(plan["stages"], typed, strict=True)):
        if only_runtime and (method.baked or st.get("baked")):  # merged by export
            continue
        method.apply(model, stage_plan, split_tensors(tensors, i, method.name))


def load_run(run_dir: str | Path, allow_bin: bool = False, dtype=None):
    run_dir = Path(run_dir)
    # recipe.yaml is not validated again: its data paths may be relative to another working directory
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    read_stages(plan.get("stages"), str(run_dir / "plan.json"))  # a bad plan is refused before the model loads
    spec = rundir.model_spec(run_dir, plan.get("model") or recipe.get("model"))
    model, tok = load(spec, allow_bin=allow_bin, dtype=dtype)
    tpath = run_dir / "adaflex.safetensors"
    with naming(run_dir / "plan.json"):
        apply_plan(model, plan, load_file(str(tpath)) if tpath.is_file() else {}, where=str(run_dir / "plan.json"))
    return model, tok


def load_export(path: str | Path, dtype=None):
    """Restore an exported model with its adaptive parts (stages whose effect is not baked into weights)."""
    path = Path(path)
    model, tok = models.load_hf(path, dtype=dtype)
    block = json.loads((path / "config.json").read_text())["adaflex"]
    state_of(model).dense = block["dense_reference"]
    tpath = path / "adaflex.safetensors"
    tensors = load_file(str(tpath)) if tpath.is_file() else {}
    with naming(path / "config.json"):
        apply_plan(model, {"stages": block.get("stages")}, tensors, only_runtime=True, where=str(path / "config.json"),
                   key="adaflex.stages")
    return model, tok
