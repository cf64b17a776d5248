"""adaflex export RUN_DIR --out DIR [--merge-adapters] [--force]"""

from __future__ import annotations

from pathlib import Path

import typer

from .common import guard, out


def export(
    run_dir: Path = typer.Argument(..., help="a run directory written by `adaflex retrofit --out`"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="checkpoint directory to write (atomically)"),
    merge_adapters: bool = typer.Option(False, "--merge-adapters", help="merge adapters into the base weights"),
    force: bool = typer.Option(False, "--force", help="replace an earlier adaflex export at --out (nothing else)"),
):
    """Write a checkpoint that transformers loads dense and adaflex loads adaptive."""
    with guard():
        from adaflex.retrofit.checkpoint import export as do_export

        path = do_export(run_dir, out_dir, merge_adapters, force=force)
        out.print(f"exported to {path}")
