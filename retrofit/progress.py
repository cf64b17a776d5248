"""Progress bars on stderr (rich), quiet when stderr is not a terminal unless ADAFLEX_PROGRESS=1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def _enabled() -> bool:
    flag = os.environ.get("ADAFLEX_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false")
    return sys.stderr.isatty()


def progress(it: Iterable, desc: str = "", total: int | None = None, disable: bool = False):
    if disable or not _enabled():
        yield from it
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

    total = total if total is not None else (len(it) if hasattr(it, "__len__") else None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(desc, total=total)
        for x in it:
            yield x
            bar.advance(task)
