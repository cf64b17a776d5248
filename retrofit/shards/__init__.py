"""Stage `shards`: heal a retrofitted model with Mixture-of-Shards adapters (MoS) or plain LoRA.

MoS (ICLR 2025) keeps one A pool and one B pool per projection type, shared by all layers; each layer
assembles a rank-r LoRA from the pools through fixed index vectors, so r-rank adapters cost the
parameters of a rank-e LoRA. Trained by distillation from the dense model; exported as plain peft LoRA.
"""

from .config import ShardsConfig

METHOD = "shards"
CONFIG = ShardsConfig
IMPL = "adaflex.retrofit.shards.apply"
