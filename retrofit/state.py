"""`model.adaflex`: the one owner of what adaflex attaches to a model, and of the patches it installs.

Methods keep their plain-Python state here (the dense reference, the run's plan, the KV spec and cache
factory, the routes runtime) instead of loose `model.adaflex_*` attributes. Weights that must move with the
model (adapters, routers) stay registered submodules, since `.to()`, `state_dict()` and `parameters()` only
see modules; the patch that hangs them on the model is recorded here like the others.

A patch is anything that changes how the transformers model runs without changing its weights: the fused
add + RMSNorm class swap (retrofit/fused.py), the routed decoder forward (routes/runtime.py), the KV
attention implementation and generate()'s cache preparation (kv/apply.py), the adapted linears
(shards/layer.py). Each installer records `patched(name, undo, saved)`; `undo_all(model)` reverts every
patch in reverse order, after which the model computes what the plain transformers model does.

Undo functions take the model as an argument (never a closure over it), so a `copy.deepcopy` of a patched
model undoes its own patches, not the original's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Undo = Callable[[Any, Any], None]  # undo(model, saved)


class AdaflexState:
    """Everything adaflex keeps on one model (`model.adaflex`)."""

    def __init__(self):
        self.dense: dict | None = None  # dense reference figures, pinned before any stage changes the shape
        self.plan: dict | None = None  # the plan `run()` applied
        self.kv = None  # the KVSpec of an installed kv stage
        self.make_cache: Callable[[], Any] | None = None  # the cache a generation starts with (None: DynamicCache)
        self.routes = None  # the installed RoutedRuntime
        self.patches: dict[str, tuple[Undo, Any]] = {}  # name -> (undo, what it restores), in install order

    def patched(self, name: str, undo: Undo, saved: Any = None) -> None:
        """Record an installed patch. Installing it again keeps the first `saved` (the model before adaflex)."""
        if name in self.patches:
            saved = self.patches[name][1]
        self.patches[name] = (undo, saved)

    def unpatched(self, name: str) -> Any:
        """Forget a patch its own uninstaller removed; returns what it had saved."""
        entry = self.patches.pop(name, None)
        return None if entry is None else entry[1]

    def __repr__(self) -> str:
        return f"AdaflexState(patches={list(self.patches)})"


def state_of(model) -> AdaflexState:
    st = model.__dict__.get("adaflex")
    if st is None:
        st = model.adaflex = AdaflexState()
    return st


def undo_all(model) -> None:
    """Revert every recorded patch, newest first: the model runs as plain transformers runs it (its weights,
    and any block a baked stage removed, stay as they are)."""
    st = state_of(model)
    for name in reversed(list(st.patches)):
        undo, saved = st.patches[name]
        undo(model, saved)
        st.patches.pop(name, None)
