"""adaflex.study: the `adaflex search` command's study of a recipe under a cost budget.

storage.py (where the study lives, dead-worker recovery), cost.py (stages to cost-model settings), session.py
(the trial objective and its memo), loop.py (`search`, the worker loop), evaluate_best.py (`--evaluate`),
outputs.py (trials.csv, pareto.png, best.yaml, search.json). The algorithms it calls are adaflex.search's.
"""

from .loop import search
from .session import Session

__all__ = ["Session", "search"]
