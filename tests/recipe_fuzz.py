"""Fuzz the recipe loader and `--set` (issue 23): bad recipes and values built from the CI recipes.

Each case is one mutation of a CI recipe (a value replaced, a key added or removed, the text corrupted, or a
`--set KEY=VALUE`), loaded as `retrofit` and `search` load it (`load_recipe`, then `checks.static`). Outcomes:
  accepted-valid    accepted, and the mutation is one a valid recipe may contain
  rejected-cleanly  a UsageError of one line naming the file (or --set) and the key (or, for a file that is no
                    YAML, the line)
  crashes           any other exception, or a UsageError of several lines or not naming the key
  wrongly-accepted  accepted although the mutation is known bad (a bool or NaN for a number, a count out of
                    range, a duplicate key, an unknown key, an empty file, bytes that are not UTF-8, ...)

    python tests/recipe_fuzz.py --cases 10000 [--seed 0]

The suite's tests/foundation/test_reliability_fuzz.py draws the same cases through hypothesis (a test helper,
like tests/tiny.py, so that no test imports from tests/bench/).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

NASTY = [True, False, None, float("nan"), float("inf"), float("-inf"), -1, 0, 10**12, 10**30, "x", "", [], {}, [1],
         {"a": 1}, 1.5, -0.5, "a\nb", "日本", 2**63, -(10**12)]
SET_VALUES = ["[1", "{", "}", "true", "false", "null", ".nan", ".inf", "-.inf", "1e400", "10**30", "9" * 5000,
              "!!python/object/apply:os.system ['true']", "&a [*a]", "- 1", "'x", "0x10", "0o7", "1_000", "2:4",
              "{low: 1, high: 0}", "{low: 0.1, high: 0.5, step: 0}", "[]", "{}", "[1, [2]]", "~", "-1",
              "1000000000000", "0.5", "3", "!!binary aGVsbG8=", "2001-12-14", "\t", "a: b: c"]
SET_KEYS = ["seed", "seed.x", "data", "data.calibration", "data.calibration.samples", "data.calibration.seq_len",
            "data.calibration.path", "eval", "eval.0", "eval.0.limit", "eval.9", "eval.٣", "eval.0.seq_len",
            "stages", "stages.0", "stages.x", "budget", "budget.flops", "search", "search.trials",
            "search.stages.kv.budget", "search.stages.prune.sparsity", "search.quality.windows", "model",
            "drop.blocks", "prune.sparsity", "shards.rank", "shards.lr", "routes.max_executed", "kv.budget",
            "kv.sinks", "kv.kernel", "routes.train", "routes.train.0", "nope", "nope.x", "eval.0.data.x"]
TEXT_KINDS = ["truncate", "non_utf8", "deep", "empty", "comment", "duplicate", "tab", "bigint", "bomb", "binary"]
KINDS = ["replace", "replace", "replace", "unknown_key", "delete", "text", "set", "set"]


def ci_recipes() -> list[Path]:
    from adaflex.retrofit.recipe import recipes_root

    return sorted((recipes_root() / "ci").glob("*.yaml"))


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaves(v, (*path, i))
    else:
        yield path, node


def _maps(node, path=()):
    if isinstance(node, dict):
        yield path
        for k, v in node.items():
            yield from _maps(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _maps(v, (*path, i))


def _kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def _known_bad(old, new) -> bool:
    """A replacement that no valid recipe holds: a bool, NaN/inf or another kind where a number was; a count
    beyond every bound; another kind of value where a string, list or mapping was."""
    if _kind(old) == "number":
        if _kind(new) != "number" and new is not None:
            return True
        if isinstance(new, float) and not math.isfinite(new):
            return True
        return isinstance(old, int) and isinstance(new, int) and abs(new) >= 10**12
    if _kind(old) == "bool":
        return _kind(new) not in ("bool",) and new is not None
    if _kind(old) in ("str", "list", "dict"):
        return _kind(new) not in (_kind(old), "NoneType") and not (_kind(old) == "list" and _kind(new) == "str")
    return False


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _needles(path) -> list[str]:
    """Ways an error may name the key at `path`: in full, by its parent, by its name, or by two adjacent parts
    (`prune.allocation` of search.stages.prune.allocation.0)."""
    pairs = [_dotted(path[i:i + 2]) for i in range(len(path) - 1)]
    return [_dotted(path), *pairs, str(path[-1]), _dotted(path[:-1]) or "recipe"]


def make_case(pick, base_texts: dict[str, str]) -> dict:
    """One case from `pick(options)` (random.choice, or a hypothesis draw): {name, data, sets, bad, needles}.
    `needles`: strings of which the error line must hold at least one (the key, or `--set` and the key)."""
    name = pick(sorted(base_texts))
    text = base_texts[name]
    raw = yaml.safe_load(text)
    kind = pick(KINDS)
    if kind == "replace":
        path, old = pick(list(_leaves(raw)))
        new = copy.deepcopy(pick(NASTY))
        node = raw
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = new
        bad = _known_bad(old, new)
        return {"name": name, "data": _dump(raw), "sets": [], "bad": bad, "needles": _needles(path),
                "what": f"{_dotted(path)}: {old!r} -> {new!r}"}
    if kind == "unknown_key":
        path = pick(list(_maps(raw)))
        node = raw
        for p in path:
            node = node[p]
        key = "zz_" + pick(["a", "b", "seed", "x y", "1"])
        node[key] = pick(NASTY[:12])
        return {"name": name, "data": _dump(raw), "sets": [], "bad": True, "needles": [key]}
    if kind == "delete":
        path, _ = pick(list(_leaves(raw)))
        node = raw
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
        return {"name": name, "data": _dump(raw), "sets": [], "bad": False, "needles": _needles(path)}
    if kind == "set":
        sets = [f"{pick(SET_KEYS)}={pick(SET_VALUES)}" for _ in range(pick([1, 1, 2]))]
        keys = [s.split("=", 1)[0] for s in sets]
        needles = [*keys, *[k.split(".")[-1] for k in keys]]
        return {"name": name, "data": text.encode(), "sets": sets, "bad": None, "needles": needles}
    how = pick(TEXT_KINDS)
    data = text.encode()
    bad = True
    if how == "truncate":
        data, bad = data[: pick([1, 5, 17, 40, 80, 120, 200]) % max(1, len(data))], None
    elif how == "non_utf8":
        cut = pick([0, 10, 50])
        data = data[:cut] + pick([b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\x80"]) + data[cut:]
    elif how == "deep":
        depth = pick([40, 100, 500, 2000])
        data += b"\nzz: " + b"[" * depth + b"]" * depth + b"\n"
    elif how == "empty":
        data = pick([b"", b"\n", b"   \n", b"~\n", b"{}\n", b"---\n"])
    elif how == "comment":
        data = b"# nothing but a comment\n# and another\n"
    elif how == "duplicate":
        data += pick([b"stages: []\n", b"seed: 1\n", b"eval: []\n", b"data: {}\n"])
    elif how == "tab":
        data = data.replace(b"  ", b"\t", 1)
        bad = None
    elif how == "bigint":
        data += b"\nseed: " + b"7" * pick([31, 4301, 20000]) + b"\n"  # a duplicate `seed` too
    elif how == "bomb":
        data += b"\nzz: &a [1,1,1,1,1,1,1,1,1,1]\nzy: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n" \
                b"zx: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nzw: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n" \
                b"zv: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    else:
        data = bytes([pick([0, 1, 7, 27, 127, 255])]) * 8 + data
    return {"name": name, "data": data, "sets": [], "bad": bad, "needles": ["(file)"], "what": how}


def _dump(raw) -> bytes:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True).encode()


def run_case(case: dict, folder: Path) -> tuple[str, str]:
    """(outcome, detail) of one case: load as the CLI does, then the model-free checks."""
    from adaflex.retrofit import checks
    from adaflex.retrofit.errors import UsageError
    from adaflex.retrofit.recipe import load_recipe

    path = folder / case["name"]
    path.write_bytes(case["data"])
    try:
        rec = load_recipe(path, case["sets"])
        checks.static(rec, str(path))
    except UsageError as e:
        msg = str(e)
        if len(msg.splitlines()) != 1:
            return "crashes", f"several lines: {msg[:200]!r}"
        if str(path) not in msg and "--set" not in msg:
            return "crashes", f"names neither file nor --set: {msg[:200]}"
        needles = [str(path) if n == "(file)" else n for n in case["needles"]]
        if not any(n in msg for n in needles) and not re.search(r"\bline \d+", msg):
            return "crashes", f"names no key of {needles}: {msg[:200]}"
        return "rejected-cleanly", msg
    except Exception as e:  # noqa: BLE001 (what the fuzz looks for)
        return "crashes", f"{type(e).__name__}: {str(e)[:200]}"
    if case["bad"]:
        return "wrongly-accepted", f"{case['name']}: {case.get('what') or case['sets'] or case['data'][:300]}"
    _check_accepted(rec)
    return "accepted-valid", ""


def _check_accepted(rec) -> None:
    """An accepted recipe holds no NaN/inf and no bool outside bool settings (the schema's strict types)."""
    for path, v in _leaves(rec.to_dict()):
        assert not (isinstance(v, float) and not math.isfinite(v)), (path, v)
        assert not (isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**64), (path, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=5, help="print this many examples of each bad outcome")
    a = ap.parse_args()
    import os

    os.chdir(Path(__file__).resolve().parents[1])  # the CI recipes name ../shared/data/... from the repo root
    rng = random.Random(a.seed)
    texts = {p.name: p.read_text() for p in ci_recipes()}
    counts: Counter = Counter()
    shown: Counter = Counter()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.cases):
            case = make_case(rng.choice, texts)
            outcome, detail = run_case(case, Path(tmp))
            counts[outcome] += 1
            if outcome in ("crashes", "wrongly-accepted") and shown[outcome] < a.show:
                shown[outcome] += 1
                print(f"{outcome}: {detail}")
    wall = time.perf_counter() - t0
    print(f"cases {a.cases} in {wall:.1f} s (seed {a.seed})")
    for k in ("accepted-valid", "rejected-cleanly", "crashes", "wrongly-accepted"):
        print(f"{k:18s} {counts[k]}")


if __name__ == "__main__":
    main()
