"""YAML for recipes and `--set` values: PyYAML's safe loader, plus the refusals a hostile file needs.

Every failure is a UsageError naming the source (file or `--set KEY`): bytes that are not UTF-8, duplicate keys
(the last one would silently win), integers too long to convert, nesting or alias expansion that would exhaust
the stack or the memory of whatever walks the result.
"""

from __future__ import annotations

import yaml
from yaml.constructor import ConstructorError

from .errors import UsageError

MAX_BYTES = 1 << 20  # the largest packaged recipe is ~2 KB; a megabyte is no recipe
MAX_DEPTH = 32  # recipes nest 5 levels deep (stages.0.kv.plan.0); PyYAML's recursive composer dies near 500
MAX_NODES = 100_000  # aliases share nodes; walking them expanded (as pydantic does) must stay small
MAX_INT_DIGITS = 30  # no setting needs more than 2**64; Python refuses to convert > 4300 digits at all


class _Loader(yaml.SafeLoader):
    """Safe loader that refuses duplicate keys and over-long integers at the line they appear."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden on purpose
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise ConstructorError(None, None, "a mapping key must be a scalar", key_node.start_mark) from None
        if key in seen:
            raise ConstructorError(None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})",
                                   key_node.start_mark)
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


class HugeInt:
    """An integer literal too long to convert: kept as a value no setting accepts, so that the schema's error
    names the key it was given for (conversion would raise, or take quadratic time, before any key is known)."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _int(loader: _Loader, node: yaml.ScalarNode):
    digits = sum(ch.isdigit() for ch in node.value)
    if digits > MAX_INT_DIGITS:
        return HugeInt(digits)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int)
_Loader.construct_mapping = _mapping  # type: ignore[method-assign]


def _check_shape(obj, source: str) -> None:
    """Refuse deep nesting and alias bombs without recursing (the walk itself must not overflow)."""
    stack, nodes = [(obj, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise UsageError(f"{source}: nested more than {MAX_DEPTH} levels deep")
        if nodes > MAX_NODES:
            raise UsageError(f"{source}: more than {MAX_NODES} values (YAML aliases expand); not a recipe")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def loads(data: str | bytes, source: str):
    """Parse YAML text (or UTF-8 bytes) from `source`; any failure is one UsageError line naming it."""
    if isinstance(data, bytes):
        if len(data) > MAX_BYTES:
            raise UsageError(f"{source}: {len(data)} bytes; a recipe is at most {MAX_BYTES}")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{source}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    try:
        obj = yaml.load(data, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = getattr(e, "problem", None) or "syntax error"
        raise UsageError(f"{source}:{where}: invalid YAML ({why})") from None
    except RecursionError:
        raise UsageError(f"{source}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # a value the constructors could not convert (e.g. a malformed timestamp)
        raise UsageError(f"{source}: invalid YAML value ({str(e).splitlines()[0][:120]})") from None
    _check_shape(obj, source)
    return obj
