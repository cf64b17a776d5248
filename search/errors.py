"""The errors every layer of adaflex raises: a one-line message and a fixed exit code (README.md, Commands;
3 is "budget infeasible").

They live here, not in retrofit/, because `search/` imports nothing else of adaflex: the pure algorithms raise
`BudgetInfeasible` themselves, and retrofit/errors.py re-exports both classes for the rest of the package.
"""

from __future__ import annotations

import re

_BREAKS = re.compile("[\\n\\r\\x0b\\x0c\\x1c-\\x1e\\x85\\u2028\\u2029]")  # what str.splitlines splits at


class AdaflexError(Exception):
    """A failure the user can act on. `str(err)` is the one line the CLI prints."""

    exit_code = 1

    def __str__(self) -> str:
        # a user's key or path may hold a line break; the message stays one line whatever it quotes
        return _BREAKS.sub(lambda m: ascii(m.group())[1:-1], super().__str__())


class BudgetInfeasible(AdaflexError):
    """No configuration meets the requested budget.

    Attributes:
        cheapest: the closest figure that *is* achievable, in the budget's own unit (the highest
            reachable sparsity for pruning, the smallest reachable token total for KV budgets, ...), when known.
        requested: the figure that was asked for, when known.
    """

    exit_code = 3

    def __init__(self, message: str, cheapest: float | None = None, requested: float | None = None):
        super().__init__(message)
        self.cheapest = cheapest
        self.requested = requested
