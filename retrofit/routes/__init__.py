"""Stage `routes`: per-example layer routes (Dr.LLM supervision, FiRST-style prefill decisions).

MCTS over execution paths labels examples (skip / execute / repeat once per block); one tiny router per
block is trained on those labels with teacher forcing; at run time the routers read the prompt once at
prefill, fix each sequence's path for every decoding step, and blocks run only on the rows that take
them (skipped blocks cost nothing; a repeated block keeps its own cache slot).
"""

from .config import RoutesConfig

METHOD = "routes"
CONFIG = RoutesConfig
IMPL = "adaflex.retrofit.routes.apply"
