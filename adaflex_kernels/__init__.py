"""adaflex kernels: Triton kernels for the retrofitted runtime, their torch references, and dispatch.

Each public function runs its Triton kernel on CUDA tensors (or on CPU tensors when the process started
with `TRITON_INTERPRET=1`, triton's interpreter) and its torch reference otherwise, or when autograd needs
gradients; `ADAFLEX_KERNELS=torch` forces the reference. Every module has the same shape: `<name>_torch`
(reference), a Triton kernel with its launcher `<name>_triton`, and the dispatching `<name>`.
This package imports nothing else of adaflex and never transformers; without triton it still imports and
runs the references.
"""

from ._dispatch import backend
from .decode_attention import decode_attention, decode_attention_torch, decode_attention_triton
from .kv_compact import compact_kv, compact_kv_torch, compact_kv_triton
from .rmsnorm import add_rmsnorm, add_rmsnorm_torch, add_rmsnorm_triton
from .routes import (
    gather_rows,
    gather_rows_torch,
    gather_rows_triton,
    scatter_add_rows,
    scatter_add_rows_torch,
    scatter_add_rows_triton,
)
from .shard_lora import shard_lora_linear, shard_lora_linear_torch, shard_lora_linear_triton

__all__ = [
    "add_rmsnorm",
    "add_rmsnorm_torch",
    "add_rmsnorm_triton",
    "backend",
    "compact_kv",
    "compact_kv_torch",
    "compact_kv_triton",
    "decode_attention",
    "decode_attention_torch",
    "decode_attention_triton",
    "gather_rows",
    "gather_rows_torch",
    "gather_rows_triton",
    "scatter_add_rows",
    "scatter_add_rows_torch",
    "scatter_add_rows_triton",
    "shard_lora_linear",
    "shard_lora_linear_torch",
    "shard_lora_linear_triton",
]
