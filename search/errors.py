"""The errors every layer of adaflex raises: a one-line message and a fixed exit code (README.md, Commands;
3 is "budget infeasible").

They live here, not in retrofit/, because `search/` imports nothing else of adaflex: the pure algorithms raise
`BudgetInfeasible` themselves, and retrofit/errors.py re-exports both classes for the rest of the package.
"""

from __future__ import annotations


class AdaflexError(Exception):
    """A failure the user can act on. `str(err)` is the one line the CLI prints."""

    exit_code = 1


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
