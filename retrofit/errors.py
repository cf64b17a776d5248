"""Errors that end a command with a one-line message and a fixed exit code (README.md, Commands)."""

from collections.abc import Iterator
from contextlib import contextmanager

from adaflex.search.errors import AdaflexError, BudgetInfeasible


class UsageError(AdaflexError):
    """Bad usage, invalid recipe or data: the message names the file and key at fault."""

    exit_code = 2


@contextmanager
def naming(path) -> Iterator[None]:
    """Prefix `path` to an AdaflexError raised inside that does not name it (a plan or data checked deep down)."""
    try:
        yield
    except AdaflexError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None


__all__ = ["AdaflexError", "BudgetInfeasible", "UsageError", "naming"]
