"""Fixtures: tiny random Llama models (hidden 64, 4 blocks) with a byte-level tokenizer, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny import ROOT, SHARED, byte_tokenizer, require_shared, tiny_llama

os.environ.setdefault("ADAFLEX_PROGRESS", "0")
__all__ = ["ROOT", "SHARED", "byte_tokenizer", "tiny_llama"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny model directory (safetensors) that every MODEL argument accepts."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model, tok = tiny_llama(), byte_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny(tiny_dir):
    from adaflex.retrofit.models import load_hf

    return load_hf(tiny_dir)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small plain-text file (real WikiText when shared/ is there, else generated sentences)."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    src = SHARED / "wikitext2_dev.txt"
    fallback = " ".join(f"sentence {i} about tiny models." for i in range(4000))
    text = src.read_text()[:60000] if src.is_file() else fallback
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _cwd_root(monkeypatch, tmp_path):
    """Run from the repo root (recipes name ../shared/data/...), with a private adaflex cache."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ADAFLEX_CACHE", os.environ.get("ADAFLEX_TEST_CACHE", str(tmp_path / "cache")))


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny-model matmuls gain nothing from more, and on a shared CPU extra OpenMP threads
    spin-wait on each other (a tiny decode step went from ~1 s to ~10 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    # a test that names ../shared/data (directly, through a module constant or a helper of its module) counts as
    # marked: see _names_shared
    config.addinivalue_line("markers", "shared_data: needs this project's real data in ../shared/data (skipped "
                            "when absent; a failure when ADAFLEX_REQUIRE_SHARED=1, as in .ci/run)")


def _names_shared(code, module, seen=None) -> bool:
    """Whether a test's code reads ../shared/data: a string constant naming it, a module global holding such a
    path (WIKI = "../shared/data/..."; SHARED), or a function of the same module (or a nested one) that does."""
    import inspect
    import types

    seen = seen if seen is not None else set()
    if code in seen:
        return False
    seen.add(code)
    for const in code.co_consts:
        if isinstance(const, str) and "shared/data" in const:
            return True
        if isinstance(const, types.CodeType) and _names_shared(const, module, seen):
            return True
    for name in code.co_names:
        value = getattr(module, name, None)
        if value is SHARED or isinstance(value, (str, Path, dict, list)) and "shared/data" in repr(value):
            return True
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__ and \
                _names_shared(inspect.unwrap(value).__code__, module, seen):  # through @torch.no_grad()
            return True
    return False


def pytest_runtest_setup(item):
    """A `shared_data` test without ../shared/data is skipped in a clone, and fails where CI promises it is there."""
    if item.get_closest_marker("shared_data") is None and not _item_names_shared(item):
        return
    require_shared()


def _item_names_shared(item) -> bool:
    """The test function, or a fixture it uses that its own module defines, names ../shared/data."""
    if not hasattr(item, "function"):
        return False
    import inspect

    if _names_shared(inspect.unwrap(item.function).__code__, item.module):
        return True
    for defs in item._fixtureinfo.name2fixturedefs.values():
        for d in defs:
            func = inspect.unwrap(d.func)
            if getattr(func, "__module__", None) == item.module.__name__ and \
                    _names_shared(func.__code__, item.module):
                return True
    return False


def pytest_collection_modifyitems(config, items):
    """Real-model tests (`@pytest.mark.real`, SmolLM2-135M) run only when a `-m` expression names them (`-m real`;
    .ci/run passes `-m "real or not real"`), so README's `python -m pytest -q` stays on the tiny models."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="real-model test: run with -m real")
    for item in items:
        if item.get_closest_marker("real") is not None:
            item.add_marker(skip)
