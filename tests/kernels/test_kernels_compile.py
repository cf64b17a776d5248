"""Every kernel compiles for real GPUs (sm_80, sm_90), checked ahead of time on a machine without one.

The interpreter is lenient where the compiler is not (dot shapes, dtype mixes, pointer arithmetic), so
the launches the launchers make are recorded (on "meta" tensors: shapes, no data) at the SmolLM2 and
7B-class sizes and compiled to cubin with the ptxas that ships with triton.
"""

import inspect
import sys

import pytest
import torch

import adaflex.kernels as K
from adaflex.kernels import shard_lora
from adaflex.kernels._dispatch import interpreting, triton
from adaflex.kernels.shard_lora import STRATEGIES

pytestmark = [
    pytest.mark.skipif(triton is None or interpreting() or "nvidia" not in getattr(triton.backends, "backends", {}),
                       reason="needs triton's NVIDIA backend in compiled (not interpreter) mode"),
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
]
SHAPES = {"smollm2": (576, 9, 3, 64, 1536), "7b": (4096, 32, 8, 128, 11008)}

MODULES = ["kv_compact", "decode_attention", "shard_lora", "routes", "rmsnorm"]
TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


def _record(monkeypatch):
    from triton.runtime.jit import JITFunction

    launches = []
    for mod_name in MODULES:
        module = sys.modules[f"adaflex.kernels.{mod_name}"]
        for name, fn in list(vars(module).items()):
            if isinstance(fn, JITFunction) and name.endswith("_kernel"):  # not the @jit helpers they call
                class Recorder:
                    def __getitem__(self, grid, _fn=fn):
                        return lambda *args, **kw: launches.append((_fn, grid, args, kw))

                monkeypatch.setattr(module, name, Recorder())
    return launches


def _compile(fn, args, kw, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kw = dict(kw)
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    values = dict(zip(inspect.signature(fn.fn).parameters, args)) | kw
    signature, constexprs = {}, {}
    for name, v in values.items():
        if name in kw:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + TY[v.dtype]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if abs(v) < 2**31 else "i64"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _launch_all(dtype, hidden, heads, kv_heads, head_dim, mlp, tokens=48, ctx=1000):
    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    idx = t(2, kv_heads, ctx // 4, dt=torch.int64)
    K.compact_kv_triton(t(2, kv_heads, ctx, head_dim), t(2, kv_heads, ctx, head_dim), idx)
    K.decode_attention_triton(t(2, heads, head_dim), t(2, kv_heads, ctx, head_dim), t(2, kv_heads, ctx, head_dim),
                              t(2, kv_heads, dt=torch.int32))
    K.decode_attention_triton(t(2, heads, head_dim), t(2, kv_heads, ctx, head_dim), t(2, kv_heads, ctx, head_dim),
                              t(2, kv_heads, dt=torch.int64), starts=t(2, kv_heads, dt=torch.int64))  # padded rows
    r, n_shards = 8, 4
    for strategy in STRATEGIES:  # the fused matmul launches with the interpreter's fixed tiles here (no autotune)
        ix = idx[0, 0, :r * n_shards].view(r, n_shards)
        K.shard_lora_linear_triton(t(tokens, hidden), t(mlp, hidden), t(64, hidden // n_shards), ix,
                                   t(64, mlp // n_shards), ix, 2.0, t(mlp), strategy=strategy)
    h = t(4, tokens, hidden)
    rows = t(2, dt=torch.int64)
    K.gather_rows_triton(h, rows)
    K.scatter_add_rows_triton(h, rows, t(2, tokens, hidden))
    K.add_rmsnorm_triton(h, h, t(hidden), 1e-5)


# Hopper (the benchmark machine) in every dtype; Ampere once. A cold triton cache pays ~0.4 s a kernel.
CASES = [(90, dt, shape) for dt in ("float16", "bfloat16", "float32") for shape in SHAPES] + [(80, "bfloat16", "7b")]


@pytest.mark.parametrize("arch,dtype,shape", CASES)
def test_kernels_compile_for_gpus(monkeypatch, arch, dtype, shape):
    launches = _record(monkeypatch)
    monkeypatch.setattr(shard_lora, "interpreting", lambda: True)  # fixed tiles: autotune would time on a GPU
    _launch_all(getattr(torch, dtype), *SHAPES[shape])
    kernels = {fn.fn.__name__ for fn, *_ in launches}
    assert len(kernels) == 8, kernels  # every kernel was launched
    for fn, _grid, args, kw in launches:
        compiled = _compile(fn, args, kw, arch)
        assert compiled.asm["cubin"], fn.fn.__name__
        assert compiled.metadata.shared <= 160 * 1024, (fn.fn.__name__, compiled.metadata.shared)
