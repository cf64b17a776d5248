"""Stage `kv`: per-layer KV-cache budgets (uniform, PyramidKV, CAKE, PrefixKV, searched) with selection
policies (StreamingLLM, SnapKV, CAKE indicator, H2O, mix) in a cache that really holds fewer bytes."""

from .config import KVConfig

METHOD = "kv"
CONFIG = KVConfig
IMPL = "adaflex.retrofit.kv.apply"
