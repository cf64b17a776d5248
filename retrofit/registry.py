"""The registered methods, one line each, in composition order (README.md, Recipes; a recipe may list any subset
in any order). A method is a `retrofit.method.Method` subclass in its own folder (peft's tuner layout)."""

from __future__ import annotations

from .drop import Drop
from .errors import UsageError
from .heal import Heal
from .kv import KV
from .method import Method
from .prune import Prune
from .routes import Routes
from .shards import Shards
from .width import Width


def registry_of(methods: list[Method]) -> dict[str, Method]:
    out: dict[str, Method] = {}
    for m in methods:
        if m.name in out:
            raise ValueError(f"method '{m.name}' registered twice")
        out[m.name] = m
    return out


METHODS: dict[str, Method] = registry_of([Drop(), Prune(), Width(), Shards(), Routes(), KV(), Heal()])


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}' (one of: {', '.join(METHODS)})") from None


def config_class(name: str):
    return get(name).config

