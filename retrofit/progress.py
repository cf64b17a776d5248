"""Progress bars on stderr (rich), quiet when stderr is not a terminal unless ADAFLEX_PROGRESS=1."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


def _enabled() -> bool:
    flag = os.environ.get("ADAFLEX_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


@contextmanager
def bar(desc: str, total: int | None, show: bool | None = None) -> Iterator[Callable[[int], None]]:
    """A bar for work counted from outside (e.g. a study's finished trials): yields `update(completed)`.
    `show` None: shown when progress is enabled (see `_enabled`)."""
    if not (_enabled() if show is None else show):
        yield lambda completed: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as p:
        task = p.add_task(desc, total=total)
        yield lambda completed: p.update(task, completed=completed)


def progress(it: Iterable, desc: str = "", total: int | None = None, disable: bool = False):
    if disable or not _enabled():
        yield from it
        return
    total = total if total is not None else (len(it) if hasattr(it, "__len__") else None)
    with bar(desc, total, show=True) as update:
        for i, x in enumerate(it, 1):
            yield x
            update(i)
