"""The method contract: one `Method` subclass per method folder (peft's `BaseTuner`, mergekit's `MergeMethod`).

A method is one package `retrofit/<name>/` whose `__init__.py` defines a `Method` subclass, plus one line in
`retrofit/registry.py`. Everything shared (the retrofit pipeline, export and load, the search) calls the hooks
below and never branches on a method's name. The subclass stays cheap to import: its hooks import the
method's torch code (apply.py, ...) inside their bodies, so validating a recipe loads no model code.

Hooks and their defaults:

- `check(model, config, where)`: settings that depend on the model; raises `UsageError` naming `where`.key,
  returns nothing. Default: nothing to check.
- `check_recipe(config, index, methods, where)`: settings that depend on the other stages of the recipe
  (`methods`: the stage methods in order, this one at `index`), checked with no model loaded, by
  `adaflex recipe validate`, `retrofit` and `search` alike; raises `UsageError` naming `where`. Default:
  nothing to check.
- `needs_calibration(config)`: whether `fit` reads the recipe's `data.calibration`. Default False.
- `data_keys(config) -> [(key, source)]`: other data sources its settings name (resolved once per run with the
  recipe's own, retrofit/sources.py). Default none.
- `plan`: the method's typed plan, a `retrofit.plan.Plan` subclass in its folder (plan.py). It describes exactly
  the keys its plans hold; its validators check the plan on its own (lengths equal to `num_layers`, kept and
  removed disjoint, shapes), its `check_model(model)` and `check_tensors(tensors)` check a model and the
  stage's tensors against it. `read_plan` (not a hook) is the one place a plan is validated: the pipeline
  after `fit` or on resume, a run directory's plan.json and an export's config.json on load and export, and
  the search; a plan that does not fit is a `UsageError` naming the file and key. `plan.dump()` is the JSON
  form, byte-identical to what `fit` wrote (tests/test_method_contract.py checks the round trip).
- `fit(ctx, config) -> StageResult`: search and train; may keep resumable progress under `ctx.state_dir`. Its
  plan may be the typed plan or its JSON form (a dict).
- `apply(model, plan, tensors)`: deterministic; a run directory or an export is restored from the plan and
  tensors alone. `plan` is typed (attribute access), as in `export_extra` and `cost`.
- `reuses_state`: True when `fit` checks what it finds under `ctx.state_dir` against the model, data and
  settings (a cache, not a resume point): `adaflex search` then keeps that folder across trials that share
  the upstream stages. Default False (each trial starts from an empty folder).
- `baked`: True when the effect lives in the exported weights (load then skips `apply`).
- `export_extra(model, plan, tensors, out_dir, merge) -> dict`: extra files of `adaflex export`; the keys
  returned go into the stage's entry of config.json (`baked: True` there makes load skip this stage).
- `search_knobs(num_layers) -> {key: Knob}`: the knobs `adaflex search` tries by default.
- `cost(config, plan, metrics, state)`: the method's cost rule; updates `state` (a `CostState`) in place.
  `plan` None means predicted from the settings, the stage spending its whole allowance.
- `contract_config() -> dict`: settings of this method for the tiny models of tests/tiny.py, used by
  tests/test_method_contract.py (fit -> apply -> run dir -> load -> export -> reload, equal logits). A
  method without one fails that test: every registered method must be covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .plan import Plan, read

if TYPE_CHECKING:
    from adaflex.search.cost import Setting, Shape
    from adaflex.search.space import Knob

    from .stage import StageContext, StageResult


@dataclass
class CostState:
    """What the stages do to the dense model in cost terms, accumulated in composition order.

    Inputs (set by the caller): the dense `shape`, the reference `context` and the dense element size
    `model_bytes`. The rest starts at the dense model and each stage's `cost` rule updates it."""

    shape: Shape
    context: int
    model_bytes: float = 4.0
    layers: int = 0  # blocks left after the stages so far (0: set from shape)
    removed: int = 0  # blocks removed so far
    sparsity: float = 0.0
    pattern: str = "unstructured"
    executed: float | None = None  # block executions per token (None: every kept block once)
    kv_fraction: float = 1.0
    kv_bytes_per_value: float | None = None
    adapter_params: int = 0
    adapter_macs: int = 0
    block_macs_fraction: float = 1.0  # share of the blocks' linear MACs kept by width pruning

    def __post_init__(self):
        if not self.layers:
            self.layers = self.shape.num_layers

    def remove(self, k: int) -> None:
        self.removed, self.layers = self.removed + k, self.layers - k

    def setting(self, sparse_kernel: bool = False) -> Setting:
        from adaflex.search.cost import Setting

        # a repeated block runs at most twice: more executions than that were never planned
        executed = None if self.executed is None else min(self.executed, 2.0 * self.layers)
        return Setting(
            removed_blocks=self.removed,
            executed=executed,
            width=self.block_macs_fraction,
            sparsity=self.sparsity,
            pattern=self.pattern,
            sparse_kernel=sparse_kernel,
            kv_fraction=self.kv_fraction,
            kv_bytes_per_value=self.kv_bytes_per_value,
            adapter_params=int(self.adapter_params),
            adapter_macs=int(self.adapter_macs),
        )


class Method:
    """Base of every method; a subclass sets `name`, `config` and `plan` and implements `fit` and `apply`."""

    name: ClassVar[str]
    config: ClassVar[type]  # pydantic settings (a retrofit.schema.Strict)
    plan: ClassVar[type[Plan]]  # typed plan (retrofit/plan.py): plan.json entries validate through it
    baked: ClassVar[bool] = False
    reuses_state: ClassVar[bool] = False

    def read_plan(self, data, where: str) -> Plan:
        """`data` (JSON, or already typed) as this method's typed plan; `where` names it in errors."""
        return read(self.plan, data, where)

    def check(self, model, config, where: str) -> None:
        return None

    def check_recipe(self, config, index: int, methods: list[str], where: str) -> None:
        return None

    def needs_calibration(self, config) -> bool:
        return False

    def data_keys(self, config) -> list[tuple[str, str]]:
        return []

    def fit(self, ctx: StageContext, config) -> StageResult:
        raise NotImplementedError(f"{type(self).__name__}.fit")

    def apply(self, model, plan: Plan, tensors: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__}.apply")

    def export_extra(self, model, plan: Plan, tensors: dict, out_dir: Path, merge: bool) -> dict:
        return {}

    def search_knobs(self, num_layers: int) -> dict[str, Knob]:
        return {}

    def cost(self, config, plan: Plan | None, metrics: dict, state: CostState) -> None:
        raise NotImplementedError(f"{type(self).__name__}.cost: no cost rule")

    def contract_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.contract_config: no tiny-model settings")

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def knobs(**forms) -> dict[str, Knob]:
    """Knobs from their recipe forms (`[choices]` or `{low, high}`), as a `search:` section writes them."""
    from adaflex.search.space import Knob

    return {k: Knob.of(v) for k, v in forms.items()}
