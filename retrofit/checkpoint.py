"""`adaflex export`: a Hugging Face checkpoint that plain transformers loads as the dense (pruned, shortened,
adapter-merged) model and that adaflex restores with its adaptive parts (restore.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import io, models, rundir
from .errors import UsageError
from .restore import load_run, read_stages, split_tensors


def _dense_state(model) -> dict[str, torch.Tensor]:
    """Base weights only (adaflex modules go to adaflex.safetensors); tied tensors written once."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if "adaflex" in name:
            continue
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue  # e.g. lm_head.weight tied to embed_tokens.weight: transformers re-ties it
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def export(run_dir: str | Path, out: str | Path, merge_adapters: bool = False, force: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if not models.is_run_dir(run_dir):
        raise UsageError(f"{run_dir}: not a run directory (needs recipe.yaml and plan.json from `adaflex retrofit`)")
    if out.resolve() == run_dir.resolve():
        raise UsageError(f"--out {out}: must differ from the run directory")
    rundir.check_export_target(run_dir, out, force)
    rundir.warn_changed(run_dir)
    plan = json.loads((run_dir / "plan.json").read_text())
    typed = read_stages(plan.get("stages"), str(run_dir / "plan.json"))
    model, tok = load_run(run_dir)
    tensors_path = run_dir / "adaflex.safetensors"
    adaptive = load_file(str(tensors_path)) if tensors_path.is_file() else {}
    meta = {"format": "pt", "adaflex.version": rundir.version(), "adaflex.recipe_sha256": plan["recipe_sha256"],
            "adaflex.base_model": str(plan.get("model"))}
    config = model.config.to_dict()
    config["adaflex"] = {
        "version": rundir.version(),
        "base_model": plan.get("model"),
        "methods": [s["method"] for s in plan["stages"]],
        "dense_reference": plan["dense_reference"],
        "stages": plan["stages"],
        "merge_adapters": merge_adapters,
    }
    with io.atomic_dir(out) as tmp:
        config["adaflex"]["stages"] = _export_stages(model, plan, typed, adaptive, tmp, merge_adapters)
        save_file(_dense_state(model), str(tmp / "model.safetensors"), metadata=meta)
        save_file({k: v.contiguous() for k, v in adaptive.items()}, str(tmp / "adaflex.safetensors"), metadata=meta)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
        (tmp / "README.md").write_text(_model_card(plan))
    return out


def _export_stages(model, plan: dict, typed: list, adaptive: dict, out: Path, merge_adapters: bool) -> list[dict]:
    """Let each stage write its extra export files (`Method.export_extra`, given the typed plans of
    `restore.read_stages`), which may also change the model (e.g. merge adapters) and returns keys for its config
    entry (`baked: true` makes load skip it)."""
    stages = []
    for i, (st, (method, stage_plan)) in enumerate(zip(plan["stages"], typed, strict=True)):
        info = method.export_extra(model, stage_plan, split_tensors(adaptive, i, method.name), out, merge_adapters)
        stages.append({**st, **info})
    return stages


def _model_card(plan: dict) -> str:
    lines = [f"# adaflex export of {plan.get('model')}", "",
             f"Made by adaflex {rundir.version()} from recipe sha256 `{plan['recipe_sha256']}`.", "",
             "Load with adaptive parts: `adaflex.retrofit.load(DIR)`; dense part: "
             "`AutoModelForCausalLM.from_pretrained(DIR)`.", "", "| stage | method | plan summary |", "|---|---|---|"]
    for i, s in enumerate(plan["stages"]):
        summary = {k: v for k, v in s["plan"].items() if isinstance(v, (int, float, str)) or k == "removed"}
        lines.append(f"| {i} | {s['method']} | `{json.dumps(summary)[:200]}` |")
    return "\n".join(lines) + "\n"
