"""What `adaflex search` may change in a recipe: the `search:` section and each method's default knobs.

A stage takes part in the search when the recipe lists it under `stages:` or names it under
`search.stages:` (then it is added in composition order with its default settings). Each searched stage
gets an `enabled` knob (on/off) and the knobs its method declares (`Method.search_knobs`), unless the `search:` section
fixes them (a scalar), replaces them (a list of choices or a `{low, high}` range) or adds others (any key
of the stage's settings). `search.stages.METHOD: false` keeps a stage out of the search (as written).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from adaflex.search.space import Knob

from .registry import METHODS, config_class
from .schema import STEPS, TOKENS, Strict, capped


class QualitySpec(Strict):
    """The trial objective: continuation perplexity (context -> continuation through the model's cache, so
    KV budgets apply) on a few windows taken from the end of a text."""

    data: str | None = Field(
        None, description="text file, hf:ID or generated (default: the first perplexity or fidelity eval's data, "
        "else the calibration data)"
    )
    layout: Literal["auto", "text", "jsonl"] = "auto"
    windows: int = Field(4, ge=1, le=256)
    context: int | None = capped(None, TOKENS, ge=8, description="default: 3/4 of the calibration seq_len")
    continuation: int | None = capped(None, TOKENS, ge=1, description="default: 1/4 of the calibration seq_len")

    @field_validator("data")
    @classmethod
    def _exists(cls, v):
        from .sources import check_spec

        return v if v is None else check_spec(v)


# The method that `search.heal` and `--heal-top` append to the top trials (issue 25: ModelOpt-NAS style
# "score unhealed, heal the best few briefly, pick by healed quality"). The name is the CLI's, as the issue
# states it; the stage itself runs through the Method contract like any other.
HEAL = "heal"


class HealSearch(Strict):
    """`search.heal`: after the trials, heal the `top` best (by unhealed quality) and pick by healed quality."""

    top: int = capped(0, STEPS, ge=0, description="default of --heal-top: trials healed after the search (0: none)")
    settings: dict[str, Any] | None = Field(
        None, description="the heal stage's settings (default: the recipe's heal stage, else heal's defaults)"
    )

    @field_validator("settings")
    @classmethod
    def _settings(cls, v):
        if v is not None:
            why = _valid(HEAL, v)
            if why:
                raise ValueError(why.removeprefix(": "))  # a model-level error has no key of its own
        return v


class SearchSection(Strict):
    trials: int = capped(20, STEPS, ge=1, description="default of --trials")
    stages: dict[str, bool | dict[str, Any]] = Field(default_factory=dict)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    context: int | None = capped(
        None, TOKENS, ge=1, description="reference context of the cost model (default: the quality context)"
    )
    sparse_kernel: bool = Field(
        False,
        description="count 2:4 sparsity as saved FLOPs (a GPU semi-structured kernel runs it; nothing does on CPU)",
    )
    heal: HealSearch | None = Field(None, description="heal the top trials after the search (--heal-top)")
    single_methods: bool = Field(
        True,
        description="enqueue one trial per method alone (the single-method points "
        "of the Pareto plot) and one with every stage as written",
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, v):
        for method, knobs in v.items():
            if method not in METHODS:
                raise ValueError(f"unknown method '{method}' (one of: {', '.join(METHODS)})")
            if isinstance(knobs, dict):
                fields = set(config_class(method).model_fields) | {"enabled"}
                for key, value in knobs.items():
                    if key not in fields:
                        raise ValueError(f"{method}.{key}: not a setting of '{method}'")
                    try:
                        Knob.of(value)
                    except ValueError as e:
                        raise ValueError(f"{method}.{key}: {e}") from None
        return v


class StageSpace:
    """One searched stage: its base settings (a dict) and its knobs (name -> Knob; `enabled` among them)."""

    def __init__(self, method: str, base: dict, knobs: dict[str, Knob], fixed_on: bool):
        self.method, self.base, self.knobs, self.fixed_on = method, base, knobs, fixed_on

    def settings(self, values: dict) -> dict:
        return {**self.base, **{k: v for k, v in values.items() if k != "enabled"}}


def _valid(method: str, settings: dict) -> str | None:
    try:
        config_class(method).model_validate(settings)
    except ValidationError as e:
        first = e.errors()[0]
        return ".".join(str(p) for p in first["loc"]) + ": " + first["msg"].removeprefix("Value error, ")
    return None


def build(recipe, num_layers: int, where: str = "recipe") -> list[StageSpace]:
    """The searched stages of `recipe` in composition order. Defaults whose values the stage's settings reject
    (a choice that conflicts with another key, a range end out of bounds) are left out; values the recipe
    asks for explicitly must validate (UsageError naming `search.stages.METHOD.KEY`)."""
    from .errors import UsageError

    sec: SearchSection = recipe.search or SearchSection()
    present = {m: cfg.model_dump(mode="json", exclude_unset=True) for m, cfg in recipe.stage_items()}
    if len(present) != len(recipe.stages):
        raise UsageError(f"{where}: stages: search handles each method once; the recipe repeats one")
    methods = [
        m
        for m in METHODS  # composition order
        if (m in present or isinstance(sec.stages.get(m), dict) or sec.stages.get(m) is True)
        and sec.stages.get(m) is not False
    ]
    spaces = []
    for m in methods:
        base = present.get(m, {})
        asked = sec.stages.get(m) if isinstance(sec.stages.get(m), dict) else {}
        knobs: dict[str, Knob] = {}
        fixed_on = False
        merged = {**METHODS[m].search_knobs(num_layers), "enabled": [True, False], **asked}
        # fixed values first, so that each knob is checked against every fixed setting
        for key, value in sorted(merged.items(), key=lambda kv: Knob.of(kv[1]) is not None):
            explicit = key in asked
            knob = Knob.of(value)
            if knob is None:  # a fixed value
                if key == "enabled":
                    fixed_on = bool(value)
                    if not fixed_on:
                        break
                else:
                    base = {**base, key: value}
                continue
            if key == "enabled":
                knobs[key] = knob
                continue
            if knob.choices is not None:
                ok = [c for c in knob.choices if _valid(m, {**base, key: c}) is None]
                bad = [c for c in knob.choices if c not in ok]
                if explicit and bad:
                    raise UsageError(
                        f"{where}: search.stages.{m}.{key}: {bad[0]!r} rejected ({_valid(m, {**base, key: bad[0]})})"
                    )
                if len(ok) <= 1:  # nothing to choose: a fixed value
                    base = {**base, key: ok[0]} if ok else base
                    continue
                knob = Knob(choices=tuple(ok))
            else:
                why = next((w for w in (_valid(m, {**base, key: c}) for c in knob.corners()) if w), None)
                if why:
                    if explicit:
                        raise UsageError(f"{where}: search.stages.{m}.{key}: {why}")
                    continue
            knobs[key] = knob
        else:
            if _valid(m, base):  # a stage the search section adds: start it at its knobs' first corners
                base = {**base, **{k: kn.corners()[0] for k, kn in knobs.items() if k != "enabled"}}
            why = _valid(m, base)
            if why:
                raise UsageError(f"{where}: stages.{m}: {why}")
            if fixed_on:
                knobs.pop("enabled", None)
            spaces.append(StageSpace(m, base, knobs, fixed_on))
    return spaces
