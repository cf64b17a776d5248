"""Errors that end a command with a one-line message and a fixed exit code (design.md §3)."""

import re
from collections.abc import Iterator
from contextlib import contextmanager

_BREAKS = re.compile("[\\n\\r\\x0b\\x0c\\x1c-\\x1e\\x85\\u2028\\u2029]")  # what str.splitlines splits at


class AdaflexError(Exception):
    """A failure the user can act on. `str(err)` is the one line the CLI prints."""

    exit_code = 1

    def __str__(self) -> str:
        # a user's key or path may hold a line break; the message stays one line whatever it quotes
        return _BREAKS.sub(lambda m: ascii(m.group())[1:-1], super().__str__())


class UsageError(AdaflexError):
    """Bad usage, invalid recipe or data: the message names the file and key at fault."""

    exit_code = 2


class BudgetInfeasible(AdaflexError):
    """No configuration meets the requested budget."""

    exit_code = 3


@contextmanager
def naming(path) -> Iterator[None]:
    """Prefix `path` to an AdaflexError raised inside that does not name it (a plan or data checked deep down)."""
    try:
        yield
    except AdaflexError as e:
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None
