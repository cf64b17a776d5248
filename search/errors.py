"""Errors raised by the search algorithms.

`search/` imports nothing else of adaflex, so this exception does not derive from the CLI's error
classes; it carries `exit_code = 3` (README.md, Commands, "budget infeasible") so the caller can map it
without a lookup table.
"""

from __future__ import annotations


class InfeasibleBudget(Exception):
    """No configuration meets the requested budget.

    Attributes:
        cheapest: the closest figure that *is* achievable, in the budget's own unit (the highest
            reachable sparsity for pruning, the smallest reachable token total for KV budgets, ...).
        requested: the figure that was asked for, when known.
    """

    exit_code = 3

    def __init__(self, message: str, cheapest: float, requested: float | None = None):
        super().__init__(message)
        self.cheapest = cheapest
        self.requested = requested
