"""Stage `prune`: layer-adaptive weight sparsity (uniform, OWL, or a DP over measured distortion curves),
magnitude or Wanda scores, unstructured or N:M patterns; may also drop whole blocks (depth option)."""

from .config import PruneConfig

METHOD = "prune"
CONFIG = PruneConfig
IMPL = "adaflex.retrofit.prune.apply"
