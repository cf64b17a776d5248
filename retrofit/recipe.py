"""The recipe: one strict pydantic model that drives the CLI and the Python API (README.md, Recipes)."""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, create_model

from . import registry, safe_yaml
from .data import MC_LAYOUTS
from .errors import UsageError
from .generated import GeneratedConfig
from .registry import METHODS, config_class
from .schema import BATCH, ITEMS, SEED, TOKENS, WINDOWS, Strict, capped
from .search_space import SearchSection
from .sources import DataPath, RunData, check_spec, parse

# a local file (which must exist), hf:NAME[/CONFIG][:SPLIT] or generated[:test] (retrofit/sources.py): the syntax
# is checked here, a hub dataset and generated text are read at preflight
Layout = Literal["auto", "text", "jsonl", "arc", "piqa", "hellaswag"]


class CalibrationData(Strict):
    path: DataPath
    samples: int = capped(64, WINDOWS, ge=1, description="number of calibration windows")
    seq_len: int = Field(512, ge=8, le=32768, description="tokens per window (never taken from the config)")
    layout: Layout = "auto"


class DataConfig(Strict):
    calibration: CalibrationData | None = None
    generated: GeneratedConfig | None = None  # settings of `generated` text (defaults when absent)


class Budget(Strict):
    flops: float | None = Field(None, gt=0, le=1)
    kv: float | None = Field(None, gt=0, le=1)
    params: float | None = Field(None, gt=0)


class EvalSpec(Strict):
    task: Literal["perplexity", "mc", "passkey", "fidelity"]
    data: DataPath
    layout: Layout = "auto"
    limit: int | None = capped(None, ITEMS, ge=1)
    seq_len: int = capped(512, TOKENS, ge=8, description="window of strided perplexity")
    stride: int | None = capped(None, TOKENS, ge=1, description="strided perplexity step (default: seq_len)")
    context: int | None = capped(None, TOKENS, ge=1)
    continuation: int | None = capped(None, TOKENS, ge=1)
    batch_size: int = capped(8, BATCH, ge=1)
    name: str | None = None

    def label(self) -> str:
        return self.name or f"{self.task}:{Path(self.data).stem}"


def _stage_tag(value: Any) -> str | None:
    if isinstance(value, dict):  # with other keys beside one method, its model names them as extra
        methods = [k for k in value if isinstance(k, str) and k in METHODS]
        return methods[0] if len(methods) == 1 else None
    return next(iter(value.model_fields_set), None) if isinstance(value, Strict) else None


def _stage_entry_type():
    # One single-key model per method; a callable discriminator picks it by the key, so the errors of a
    # stage's settings point at `stages.N.method.key` and an unknown method gets one clear message.
    members = [
        Annotated[create_model(f"{name}_stage", __base__=Strict, **{name: (config_class(name), ...)}), Tag(name)]
        for name in METHODS
    ]
    return Annotated[
        Union[tuple(members)],  # noqa: UP007
        Discriminator(
            _stage_tag,
            custom_error_type="unknown_stage",
            custom_error_message=f"each stage is {{method: settings}} with method one of: {', '.join(METHODS)}",
        ),
    ]


StageEntry = _stage_entry_type()


class Recipe(Strict):
    model: str | None = None
    seed: int = capped(0, SEED, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    budget: Budget | None = None
    stages: list[StageEntry] = Field(default_factory=list)
    eval: list[EvalSpec] = Field(default_factory=list)
    search: SearchSection | None = None  # what `adaflex search` may change (retrofit ignores it)

    def stage_items(self) -> list[tuple[str, Strict]]:
        """(method, settings) for each stage, in order."""
        out = []
        for entry in self.stages:
            (name,) = type(entry).model_fields
            out.append((name, getattr(entry, name)))
        return out

    def stage_sources(self) -> list[tuple[str, str]]:
        """(recipe key, source) of the data each stage's settings name (the method's `data_keys`)."""
        return [(f"stages.{i}.{method}.{key}", value) for i, (method, cfg) in enumerate(self.stage_items())
                for key, value in registry.get(method).data_keys(cfg)]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def sha256(self) -> str:
        return hashlib.sha256(yaml.safe_dump(self.to_dict(), sort_keys=True).encode()).hexdigest()


# ---- loading, overrides and error reporting ----


def format_errors(source: str, err: ValidationError) -> str:
    """All errors on one line, each with its dotted path: `file: stages.0.drop.blocks: msg; ...`."""
    parts = []
    for e in err.errors():
        loc = []
        for item in e["loc"]:
            if not loc or loc[-1] != item:  # the union tag repeats the stage name
                loc.append(item)
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}")
    return f"{source}: " + "; ".join(parts)


def _index(part: str, size: int) -> int | None:
    """A list index written in a dotted key, if it is one (ASCII digits, within the list)."""
    if re.fullmatch(r"[0-9]{1,9}", part) and int(part) < size:
        return int(part)
    return None


def apply_override(raw: dict, assignment: str, source: str = "--set") -> None:
    """Apply `KEY=VALUE` to a raw recipe dict. `prune.sparsity` addresses the first `prune` stage."""
    if "=" not in assignment:
        raise UsageError(f"{source} {assignment}: expected KEY=VALUE")
    key, text = assignment.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise UsageError(f"{source} {assignment}: empty key part")
    value = safe_yaml.loads(text, f"{source} {key}") if text.strip() else None
    node: Any = raw
    if parts[0] in METHODS and parts[0] not in Recipe.model_fields:
        stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
        match = [s for s in stages if isinstance(s, dict) and parts[0] in s]
        if not match:
            raise UsageError(f"{source} {key}: the recipe has no '{parts[0]}' stage")
        node = match[0]
    elif parts[0] not in Recipe.model_fields:
        raise UsageError(f"{source} {key}: unknown key '{parts[0]}'")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "recipe"
        if not isinstance(node, (dict, list)):
            raise UsageError(f"{source} {key}: '{here}' is not a mapping (it is {type(node).__name__})")
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _index(part, len(node))
            if idx is None:
                raise UsageError(f"{source} {key}: no item '{part}' in '{here}' ({len(node)} items)")
            if last:
                node[idx] = value
            node = node[idx]
        elif last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read recipe ({e.strerror or e})") from None
    raw = safe_yaml.loads(data, str(path))
    if raw is None or raw == {}:
        raise UsageError(f"{path}: the recipe is empty (give at least `stages:` or `eval:`)")
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    return raw


def validate(raw: dict | Recipe, source: str = "recipe") -> Recipe:
    if isinstance(raw, Recipe):
        return raw
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UsageError(format_errors(source, e)) from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Recipe:
    """Read, override and validate a recipe; `None` is the packaged quickstart."""
    path = Path(path) if path is not None else packaged("quickstart.yaml")
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, str(path))


def recipes_root() -> Path:
    return Path(str(resources.files("adaflex.recipes")))


def packaged(name: str) -> Path:
    """A recipe shipped with adaflex, by file name relative to the recipes folder."""
    path = recipes_root() / name
    if not path.is_file():
        raise UsageError(f"{name}: no such packaged recipe (see `adaflex recipe list`)")
    return path


def resolve_recipe_path(name: str) -> Path:
    """A path on disk, else a packaged recipe name (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (name, f"{name}.yaml"):
        if (recipes_root() / cand).is_file():
            return recipes_root() / cand
    raise UsageError(f"{name}: no such recipe file (nor a packaged recipe of that name)")


def list_packaged() -> list[Path]:
    root = recipes_root()
    return sorted(p.relative_to(root) for p in root.rglob("*.yaml"))


def with_evals(recipe, values: list[str], limit: int | None, source: str):
    """The recipe with one evaluation per `--eval` source (perplexity for text, mc for multiple-choice records),
    and the RunData that read them (the run reads them no second time)."""
    data = RunData(recipe)
    extra = []
    for value in values:
        try:
            check_spec(value)
        except ValueError as e:
            raise UsageError(f"--eval {e}") from None
        if parse(value).kind == "generated":
            task = "fidelity"
        else:
            task = "mc" if data.get(value, "auto", "--eval").layout in MC_LAYOUTS else "perplexity"
        extra.append({"task": task, "data": value, **({"limit": limit} if limit else {}),
                      "name": f"{task}:{Path(value).name}" if parse(value).kind == "file" else f"{task}:{value}"})
    raw = recipe.to_dict()
    raw["eval"] = list(raw.get("eval", [])) + extra
    return validate(raw, source), data
