"""Stage `width`: layer-adaptive structured pruning of FFN channels and attention heads (GQA-aware)."""

from .config import WidthConfig

METHOD = "width"
CONFIG = WidthConfig
IMPL = "adaflex.retrofit.width.apply"
