"""The `adaflex` command: a thin Typer app; each command lives in its own module."""

from __future__ import annotations

import typer

from . import evaluate, export, models, recipe, retrofit, search

app = typer.Typer(
    name="adaflex",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Retrofit pretrained causal LMs with adaptive compute.",
)
app.command("retrofit")(retrofit.retrofit)
app.command("search")(search.search)
app.command("export")(export.export)
app.command("eval")(evaluate.evaluate)
app.add_typer(recipe.app, name="recipe")
app.add_typer(models.app, name="models")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
