"""Errors that end a command with a one-line message and a fixed exit code (README.md, Commands)."""

from adaflex.search.errors import AdaflexError, BudgetInfeasible


class UsageError(AdaflexError):
    """Bad usage, invalid recipe or data: the message names the file and key at fault."""

    exit_code = 2


__all__ = ["AdaflexError", "BudgetInfeasible", "UsageError"]
