"""What every command shares: the one-line error contract, JSON or rich output, logging to stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from enum import Enum

import typer
from rich.console import Console
from rich.table import Table

from adaflex.retrofit.errors import AdaflexError

out = Console()
err = Console(stderr=True)


class Format(str, Enum):
    human = "human"
    json = "json"


@contextmanager
def guard():
    """AdaflexError → its one-line message and exit code; Ctrl-C → 130 (finished work is already on disk)."""
    try:
        yield
    except AdaflexError as e:
        typer.echo(f"adaflex: error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("adaflex: interrupted; finished work is kept, rerun the same command to resume", err=True)
        raise typer.Exit(130) from None


def log(msg: str) -> None:
    err.print(f"[dim]adaflex:[/dim] {msg}", highlight=False)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


# kv_bytes_ratio: on the 2 × 128-token probe; *_at_context: at the evaluation's own length (`kv_context` tokens)
COST_KEYS = ("layers_executed_mean", "kv_bytes_ratio", "kv_context", "kv_bytes_at_context",
             "kv_bytes_ratio_at_context", "sparsity", "trainable_params", "flops_ratio", "tokens_per_s")


def result_table(title: str, columns: list[str], rows: list[list]) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[fmt(x) for x in r])
    return table
