"""adaflex models list | prepare NAME"""

from __future__ import annotations

import typer

from .common import guard, out

app = typer.Typer(no_args_is_help=True, help="Embedded models.")


@app.command("list")
def list_():
    """Embedded models and whether they are installed and converted."""
    with guard():
        import importlib.util

        from adaflex.retrofit.models import EMBEDDED, embedded_path

        for name, spec in EMBEDDED.items():
            installed = importlib.util.find_spec(spec.module) is not None
            ready = (embedded_path(name) / "model.safetensors").is_file()
            state = "ready" if ready else ("installed" if installed else f"missing: {spec.install_command}")
            out.print(f"{name:16s} {state:12s} {spec.description}")


@app.command()
def prepare(name: str = typer.Argument(...), force: bool = typer.Option(False, "--force")):
    """Convert an embedded model once into the cache ($ADAFLEX_CACHE, default ~/.cache/adaflex)."""
    with guard():
        from adaflex.retrofit.models import prepare as do_prepare

        out.print(f"{name}: {do_prepare(name, force)}")
