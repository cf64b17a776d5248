"""gpu_e2e.py's training-side figures: the heal stage's step throughput, and shard-LoRA unmerged against peft's
unmerged LoRA and the merged matmul (a bench module, not collected by pytest)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from adaflex.kernels import shard_lora_linear
from adaflex.retrofit.arch import decoder_layers
from adaflex.retrofit.heal.apply import trained_weights
from adaflex.retrofit.heal.config import HealConfig
from adaflex.retrofit.heal.train import TopKTeacher, heal


def heal_throughput(model, teacher, stream: torch.Tensor, steps: int, batch: int = 8, seq_len: int = 128):
    """Heal `model` in place as the quickstart does (norms and the last 3 blocks, top-64 KL to `teacher`) for
    `steps` steps on windows of `stream`; returns (model, the heal's own figures: training tokens/s included)."""
    dev = next(model.parameters()).device
    last = min(3, len(decoder_layers(model)) - 1)
    cfg = HealConfig(train=["norms", "last_blocks"], last_blocks=last, tokens=steps * batch * seq_len,
                     batch_size=batch, top_k=64, weights_lr=2e-4, warmup=2, seq_len=seq_len)
    windows = stream[: 4 * batch * seq_len].view(4 * batch, seq_len).to(dev)
    groups = {"fast": {}, "slow": {n: model.get_parameter(n) for n in trained_weights(model, cfg)}}
    out = heal(model, windows, groups, cfg, TopKTeacher(teacher, cfg.top_k, cfg.temperature), steps=steps, seed=0)
    model.eval()
    dtype = next(model.parameters()).dtype
    return model, {"train_tokens_per_s": out["train_tokens_per_s"], "steps": steps, "batch": batch,
                   "seq_len": seq_len, "loss_first_last": [out["train_loss_first"], out["train_loss_last"]],
                   "trained_params": sum(p.numel() for p in groups["slow"].values()), "dtype": str(dtype)}


def _timings(fn, dev) -> tuple[float, float | None]:
    """(eager µs, graph-replay µs or None): eager is what a decode loop pays (host launches included); the
    CUDA-graph replay is what the GPU itself spends (tests/bench/kernel_speed.py times kernels so)."""
    fn()
    if dev.type != "cuda":
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best * 1e6, None
    from triton.testing import do_bench, do_bench_cudagraph

    torch.cuda.synchronize()
    eager = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    try:
        graph = do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    except Exception:  # noqa: BLE001 - not capturable: eager only
        graph = None
    return eager, graph


@torch.no_grad()
def lora_vs_peft(d_in: int, d_out: int, tokens: int, dev, dtype, r: int = 8, n_shards: int = 4,
                 layers: int = 30) -> dict:
    """One projection serving `tokens` tokens (a decode batch): merged weight, peft's unmerged LoRA module (rank
    r) and adaflex's unmerged shard-LoRA (rank r from a pool of layers × n_shards shards, MoS's smallest
    setting), each timed eagerly and by CUDA-graph replay."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)).to(dev, dtype)
    w = base[0].weight.detach().clone()
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=0.0))
    for name, p in peft_model.named_parameters():  # a trained adapter: B is not zero
        if "lora_B" in name:
            p.data.normal_(0, 1 / r)
    peft_model.eval()
    n_pool = layers * n_shards
    pool_a = torch.randn(n_pool, d_in // n_shards, dtype=dtype, device=dev) / math.sqrt(d_in)
    pool_b = torch.randn(n_pool, d_out // n_shards, dtype=dtype, device=dev) / r
    idx_a, idx_b = (torch.randint(0, n_pool, (r, n_shards), device=dev) for _ in range(2))
    x = torch.randn(tokens, d_in, dtype=dtype, device=dev)
    systems = {"merged": lambda: F.linear(x, w), "peft_lora": lambda: peft_model(x),
               "shard_lora": lambda: shard_lora_linear(x, w, pool_a, idx_a, pool_b, idx_b, 2.0)}
    out = {}
    for name, fn in systems.items():
        out[f"{name}_eager_us"], out[f"{name}_graph_us"] = _timings(fn, dev)
    for kind in ("eager", "graph"):
        s, p = out[f"shard_lora_{kind}_us"], out[f"peft_lora_{kind}_us"]
        out[f"shard_over_peft_{kind}"] = s / p if s is not None and p is not None else None
    return out
