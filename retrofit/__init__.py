"""adaflex.retrofit: model loading, recipes, data, evaluation, the retrofit stages and export.

Python API: `run(recipe, model)` retrofits, `load(path)` restores any MODEL (name, directory, export or
run directory) with its adaptive parts, `export(run_dir, out)` writes a checkpoint."""

from .errors import AdaflexError, BudgetInfeasible, UsageError
from .recipe import Recipe, load_recipe


def run(*args, **kwargs):
    from .pipeline import run as _run

    return _run(*args, **kwargs)


def load(path=None, **kwargs):
    """(model, tokenizer) for any MODEL: `smollm2-135m`, a HF directory, an export or a run directory."""
    from .restore import load as _load

    return _load(path, **kwargs)


def export(run_dir, out, merge_adapters: bool = False):
    from .checkpoint import export as _export

    return _export(run_dir, out, merge_adapters)


__all__ = ["AdaflexError", "BudgetInfeasible", "Recipe", "UsageError", "export", "load", "load_recipe", "run"]
