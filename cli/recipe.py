"""adaflex recipe validate FILE... | show FILE | list"""

from __future__ import annotations

import typer
import yaml

from .common import guard, out

app = typer.Typer(no_args_is_help=True, help="Validate, show and list recipes.")


@app.command()
def validate(
    files: list[str] = typer.Argument(..., help="recipe files or packaged names"),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE applied before validating"),
):
    """Check recipes as `retrofit` and `search` do before loading a model (schema, data files, search knobs)."""
    with guard():
        from adaflex.retrofit import checks
        from adaflex.retrofit.errors import UsageError
        from adaflex.retrofit.recipe import load_recipe, resolve_recipe_path

        failed = []
        for f in files:
            try:
                path = resolve_recipe_path(f)
                checks.static(load_recipe(path, overrides), str(path))
                out.print(f"ok  {f}")
            except UsageError as e:
                typer.echo(f"adaflex: error: {e}", err=True)
                failed.append(f)
        if failed:
            raise typer.Exit(2)


@app.command()
def show(
    file: str = typer.Argument(..., help="recipe file or packaged name"),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE"),
):
    """Print a recipe with every default filled in."""
    with guard():
        from adaflex.retrofit.recipe import load_recipe, resolve_recipe_path

        rec = load_recipe(resolve_recipe_path(file), overrides)
        typer.echo(yaml.safe_dump(rec.to_dict(), sort_keys=False), nl=False)


@app.command("list")
def list_():
    """The recipes shipped with adaflex."""
    with guard():
        from adaflex.retrofit.recipe import list_packaged, recipes_root

        for p in list_packaged():
            first = (recipes_root() / p).read_text().splitlines()[0].lstrip("# ")
            out.print(f"{str(p):40s} {first}")
