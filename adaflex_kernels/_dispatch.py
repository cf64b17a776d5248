"""Backend choice shared by every kernel: Triton where it can run, the torch reference elsewhere.

Triton runs on CUDA tensors, and on CPU tensors under triton's interpreter. `ADAFLEX_KERNELS=torch`
(read at each call) forces the reference everywhere. The interpreter is on when `TRITON_INTERPRET=1` was
set before triton was imported: triton decorates its own library (tl.sum, tl.max, ...) at import, for
the interpreter or for the compiler, so setting the variable later cannot switch a running process.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; the references still work without it
    triton = tl = None

__all__ = ["backend", "interpreting", "jit", "next_pow2", "tl", "triton"]

# Without triton the kernels stay plain (never called) functions, so the modules still import.
jit = triton.jit if triton is not None else (lambda fn: fn)


def interpreting() -> bool:
    """True when triton was loaded for its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)  # the mode triton's own library was built in


def backend(*tensors: torch.Tensor) -> str:
    """'triton' or 'torch': which implementation a kernel uses for these inputs."""
    choice = os.environ.get("ADAFLEX_KERNELS", "auto").lower() or "auto"
    if choice not in ("auto", "torch"):
        raise ValueError(f"ADAFLEX_KERNELS must be 'auto' or 'torch', got {choice!r}")
    if choice == "torch" or triton is None:
        return "torch"
    # The Triton paths have no backward: anything that needs gradients takes the reference.
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"} or (devices == {"cpu"} and interpreting()):
        return "triton"
    return "torch"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()
