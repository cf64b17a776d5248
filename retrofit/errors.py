"""Errors that end a command with a one-line message and a fixed exit code (README.md, Commands)."""


class AdaflexError(Exception):
    """A failure the user can act on. `str(err)` is the one line the CLI prints."""

    exit_code = 1


class UsageError(AdaflexError):
    """Bad usage, invalid recipe or data: the message names the file and key at fault."""

    exit_code = 2


class BudgetInfeasible(AdaflexError):
    """No configuration meets the requested budget."""

    exit_code = 3
