"""Stage `drop`: remove the k blocks of least influence (ShortGPT), the static baseline of layer routes."""

from .config import DropConfig

METHOD = "drop"
CONFIG = DropConfig
IMPL = "adaflex.retrofit.drop.apply"
