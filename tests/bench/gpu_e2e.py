"""End to end on a GPU: serving speed, memory, quality and healing throughput of retrofitted models (a script).

For each model, each system (dense, kv 25%, routes, drop at the routes' executed blocks, width 25%, the
quickstart) is measured at --dtype: prefill tokens/s at each --contexts, decode tokens/s at each --batches after
a --decode-context prompt, peak memory, and continuation perplexity on WikiText windows (fp32 and --dtype),
compared with the CPU figure. Speed-ups are printed beside the ideal their cost figures predict: prefill 1 /
flops_ratio (the linears' MACs), decode the bytes a step reads (weights of executed blocks + LM head + KV held),
dense over retrofitted, since single-token decoding is memory-bound. Generation runs eagerly (no CUDA graphs, no
torch.compile: the budgeted cache changes shape every step); the `mode` field says so. Then shard-LoRA unmerged
against peft's unmerged LoRA and the merged matmul at 1-64 tokens, and the heal stage's training tokens/s.

Models: `smollm2` (the embedded SmolLM2-135M and the run directories of a bundle that
tests/bench/gpu_prepare.py writes on a CPU machine, with the CPU perplexities), `wide` (7B-like blocks, random
weights, built from a config in seconds; its CPU perplexity is measured here on the host CPU) and `tiny` (a tiny
random Llama: the CPU check of this script). Every figure is written to --out as soon as it is measured; a cell
that fails or runs past --deadline is recorded with its reason and the rest goes on.

    bash tests/bench/gpu.sh e2e                                          # on the GPU machine
    python tests/bench/gpu_e2e.py --device cpu --dtype float32 --models tiny --out runs/gpu-e2e-cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from adaflex.retrofit import restore
from adaflex.retrofit.arch import decoder_layers, new_cache
from adaflex.retrofit.evaluate.cost import cost_figures, held_bytes
from adaflex.retrofit.evaluate.ppl import continuation_nll
from adaflex.retrofit.kv.apply import apply as kv_apply
from adaflex.retrofit.kv.config import KVConfig
from adaflex.retrofit.kv.plan import KVPlan

sys.path.insert(0, str(Path(__file__).parent))  # a bench script: its siblings, not test imports
from gpu_heal import heal_throughput, lora_vs_peft  # noqa: E402
from synthetic import build, drop_blocks, narrow_uniform  # noqa: E402

# (hidden, intermediate, heads, kv heads, layers, vocab): Mistral-7B's block shape with 4 blocks; SmolLM2's
# vocabulary, so that the bundle's WikiText ids are valid input
SHAPES = {"wide": (4096, 14336, 32, 8, 4, 49152), "tiny": (64, 172, 4, 2, 4, 512)}
SYSTEMS = ("dense", "kv", "routes", "drop", "width", "quickstart")


def log(msg: str) -> None:
    print(f"[gpu-e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_llama(shape, dev):
    hidden, inter, heads, kv, layers, vocab = shape
    return build(hidden, inter, heads, kv, layers, vocab=vocab, device=dev, max_positions=32768)


# ---- systems built in code (random-weight models: no calibration data is worth fitting on) ----

def make_kv(model, budget: float = 0.25):
    """kv at `budget`, mix policy, uniform over layers (a searched plan needs a trained model's attention)."""
    cfg = KVConfig(budget=budget, allocation="uniform", policy="mix")
    plan = KVPlan.model_validate({"num_layers": len(decoder_layers(model)), "config": cfg.model_dump(),
                                  "fractions": None})
    kv_apply(model, plan, {})
    return model


def make_width(model, fraction: float, ids: torch.Tensor):
    return narrow_uniform(model, fraction, ids, 32 if model.config.intermediate_size >= 1024 else 4)


def built_systems(name: str, base, stream: torch.Tensor, heal_steps: int, heal_rows: list):
    """{name: builder() -> model} for a random-weight model: each builder copies `base` (kept in fp32: the
    teacher of the heal); the quickstart's heal figures go to `heal_rows`."""
    n = len(decoder_layers(base))
    calib = stream[: 2 * 64].view(2, 64).to(next(base.parameters()).device)

    def quickstart():
        model, figures = heal_throughput(make_width(copy.deepcopy(base), 0.2, calib), base, stream, steps=heal_steps)
        heal_rows.append({"model": name, "system": "width 20% + heal step (the quickstart's)", "heal": figures})
        return model

    return {
        "dense": lambda: copy.deepcopy(base),
        "kv": lambda: make_kv(copy.deepcopy(base)),
        "drop": lambda: drop_blocks(copy.deepcopy(base), max(1, round(0.25 * n))),
        "width": lambda: make_width(copy.deepcopy(base), 0.25, calib),
        "quickstart": quickstart,  # the quickstart's shape: width 20%, then heal distilled from the dense model
    }


# ---- measurements ----

@torch.no_grad()
def continuation_ppl(model, windows: torch.Tensor, context: int, batch: int = 2) -> float:
    """exp(mean NLL) of each window's tokens after `context` prefilled through the model's own cache (so KV eviction
    applies): `adaflex eval --task perplexity --context C --continuation N`'s scoring, on given token ids."""
    total, count = 0.0, 0
    for x in windows.split(batch):
        nll, n = continuation_nll(model, x.to(model.device), context)
        total, count = total + nll, count + n
    return math.exp(total / count)


def best_time(fn, dev, repeats: int) -> float:
    fn()  # warm-up: Triton compiles, cuBLAS picks its kernels
    best = math.inf
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def prefill_tok_s(model, ids: torch.Tensor, repeats: int) -> float:
    dev = ids.device
    t = best_time(lambda: model(input_ids=ids, cache=new_cache(model), use_cache=True, logits_to_keep=1), dev,
                  repeats)
    return ids.numel() / t


@torch.no_grad()
def decode(model, ids: torch.Tensor, steps: int, repeats: int) -> dict:
    """Greedy single-token steps after prefilling `ids` [batch, context]: tokens/s over the steps, and what the
    cache held after the prompt (bytes, and the blocks executed where routes decide them)."""
    dev, best, held, executed = ids.device, math.inf, 0, None
    for r in range(repeats + 1):  # the first pass warms up
        cache = new_cache(model)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        held = held_bytes(cache)
        routes = getattr(cache, "adaflex_routes", None)
        executed = float(routes.float().sum(-1).mean()) if routes is not None else None
        tok = out.logits[:, -1:].argmax(-1)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync(dev)
        if r:
            best = min(best, time.perf_counter() - t0)
    return {"tok_s": ids.shape[0] * steps / best, "kv_held_bytes": held, "executed_blocks": executed}


def read_bytes(model, executed: float | None = None) -> int:
    """Weight bytes a decode step reads: the blocks it executes and the LM head (the embedding is a row lookup)."""
    layers = decoder_layers(model)
    per = [sum(p.numel() * p.element_size() for p in blk.parameters()) for blk in layers]
    share = 1.0 if executed is None else executed / len(layers)
    head = model.get_output_embeddings().weight
    return int(sum(per) * share + head.numel() * head.element_size())


def peak_reset(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


class Recorder:
    """Every figure goes to `out/e2e.json` as soon as it is measured; a failing cell records its reason."""

    def __init__(self, out: Path, args, deadline: float):
        self.path, self.t0, self.deadline = out / "e2e.json", time.perf_counter(), deadline
        self.data = {"args": vars(args), "mode": "eager (no CUDA graphs, no torch.compile)", "rows": [],
                     "lora": [], "heal": []}
        if args.device.startswith("cuda") and torch.cuda.is_available():
            self.data["gpu"] = torch.cuda.get_device_name(0)
        self.data["torch"] = torch.__version__
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - (time.perf_counter() - self.t0)

    def cell(self, row: dict, key: str, fn):
        if self.left() <= 0:
            row[key] = "skipped: deadline"
            return None
        try:
            row[key] = fn()
        except Exception as e:  # noqa: BLE001 - one failing cell (an OOM at 16K, say) must not end the run
            row[key] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log(f"{row.get('model')} {row.get('system')} {key}: {row[key]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        self.save()
        return row[key]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def measure(rec: Recorder, row: dict, model, dense_row: dict | None, stream: torch.Tensor, args, dev, dtype) -> None:
    """One system: quality first (fp32, then --dtype), then speed and memory at --dtype, then ideals."""
    ctx, cont, nwin = args.ppl_context, args.ppl_continuation, args.ppl_windows
    if row.get("cpu_ppl") is None:  # measured here on the host CPU too: one window (a 7B-like block is slow there)
        nwin = 1
    span = ctx + cont
    windows = stream[: nwin * span].view(nwin, span)
    rec.cell(row, "ppl_fp32", lambda: continuation_ppl(model.float(), windows, ctx))
    if row.get("cpu_ppl") is None and row["system"] in args.cpu_check and rec.left() > 0:
        rec.cell(row, "cpu_ppl", lambda: continuation_ppl(copy.deepcopy(model).cpu(), windows, ctx))
    model.to(dtype)
    rec.cell(row, f"ppl_{args.dtype}", lambda: continuation_ppl(model, windows, ctx))
    for key in ("ppl_fp32", f"ppl_{args.dtype}"):
        if isinstance(row.get(key), float) and isinstance(row.get("cpu_ppl"), float):
            row[f"{key}_vs_cpu"] = row[key] / row["cpu_ppl"] - 1
    probe = stream[:256].view(2, 128).to(dev)
    cost = rec.cell(row, "cost", lambda: cost_figures(model, probe))
    for c in args.contexts:
        ids = stream[:c].view(1, c).to(dev)
        peak_reset(dev)
        rec.cell(row, f"prefill_{c}_tok_s", lambda ids=ids: prefill_tok_s(model, ids, args.repeats))
        row[f"prefill_{c}_peak_gib"] = peak_gib(dev)
    c = args.decode_context
    for b in args.batches:
        ids = torch.stack([stream[(i * 997) % (stream.numel() - c):][:c] for i in range(b)]).to(dev)
        peak_reset(dev)
        d = rec.cell(row, f"decode_b{b}", lambda ids=ids: decode(model, ids, args.decode_steps, args.repeats))
        row[f"decode_b{b}_peak_gib"] = peak_gib(dev)
        if isinstance(d, dict):
            row[f"decode_b{b}_read_bytes"] = read_bytes(model, d["executed_blocks"]) + d["kv_held_bytes"]
    row["weight_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if dense_row is None:
        return
    if isinstance(cost, dict):
        row["ideal_prefill_x"] = 1 / cost["flops_ratio"]
    for c in args.contexts:
        a, d = row.get(f"prefill_{c}_tok_s"), dense_row.get(f"prefill_{c}_tok_s")
        if isinstance(a, float) and isinstance(d, float):
            row[f"prefill_{c}_x"] = a / d
    for b in args.batches:
        a, d = row.get(f"decode_b{b}"), dense_row.get(f"decode_b{b}")
        if isinstance(a, dict) and isinstance(d, dict):
            row[f"decode_b{b}_x"] = a["tok_s"] / d["tok_s"]
            row[f"ideal_decode_b{b}_x"] = dense_row[f"decode_b{b}_read_bytes"] / row[f"decode_b{b}_read_bytes"]
    rec.save()


def run_model(rec: Recorder, name: str, args, dev, dtype) -> None:
    bundle = Path(args.bundle)
    cpu = json.loads((bundle / "cpu.json").read_text()) if (bundle / "cpu.json").is_file() else {}
    if cpu.get("stream") and (name == "smollm2" or max(cpu["stream"]) < SHAPES[name][-1]):
        stream = torch.tensor(cpu["stream"], dtype=torch.long)
    else:  # no bundle: random ids (the speed of random-weight models does not depend on them)
        g = torch.Generator().manual_seed(0)
        stream = torch.randint(0, SHAPES.get(name, SHAPES["wide"])[-1], (40_000,), generator=g)
    need = max(max(args.contexts), args.decode_context + 997 * max(args.batches), args.ppl_windows *
               (args.ppl_context + args.ppl_continuation))
    stream = stream.repeat(math.ceil(need / stream.numel()) + 1)  # long contexts wrap the text around
    if name == "smollm2":
        runs = bundle / "runs"
        found = {s: runs / s for s in SYSTEMS[1:] if (runs / s / "plan.json").is_file()}
        log(f"smollm2: bundle systems {sorted(found)}")

        def loader(s):
            return lambda: restore.load(found[s] if s in found else "smollm2-135m")[0].to(dev).eval()

        systems = {"dense": loader("dense"), **{s: loader(s) for s in found}}
        cpu_ppl = cpu.get("ppl", {})
    elif rec.left() <= 0:  # not even built: a 7B-like block shape takes GPU memory and seconds
        rec.data["rows"] += [{"model": name, "system": s, "built": "skipped: deadline"} for s in args.systems
                             if s != "routes"]
        return
    else:
        base = random_llama(SHAPES[name], dev)
        systems = built_systems(name, base, stream, args.heal_steps, rec.data["heal"])
        cpu_ppl = {}
    dense_row = None
    for s, make in systems.items():
        if s not in args.systems:
            continue
        row = {"model": name, "system": s, "cpu_ppl": cpu_ppl.get(s)}
        rec.data["rows"].append(row)
        log(f"{name} {s}: building")
        model = rec.cell(row, "built", lambda b=make: b())
        if model is None:
            continue
        row["built"] = True
        measure(rec, row, model, dense_row, stream, args, dev, dtype)
        log(f"{name} {s}: done ({rec.left():.0f} s left)")
        if s == "dense":
            dense_row = row
        del model
        if rec.left() <= 0:
            break
    if name != "smollm2":
        return
    # healing throughput on SmolLM2: the heal stage's step on the narrowed run (fp32, as the stage trains)
    if "width" in systems and rec.left() > 0:
        hrow = {"model": name, "system": "width 25% + heal step"}
        rec.data["heal"].append(hrow)
        rec.cell(hrow, "heal", lambda: heal_throughput(systems["width"]().float(), systems["dense"]().float(),
                                                       stream, steps=args.heal_steps)[1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "wide"], choices=["smollm2", "wide", "tiny"])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--bundle", default=".gpu", help="gpu_prepare.py's folder: runs/ and cpu.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384], help="prefill lengths")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    ap.add_argument("--decode-context", type=int, default=4096, help="prompt before the decode steps")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="best of")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--ppl-continuation", type=int, default=128)
    ap.add_argument("--cpu-check", nargs="*", default=["dense", "width"], choices=SYSTEMS,
                    help="systems without a bundled CPU figure whose perplexity is also measured on the host CPU")
    ap.add_argument("--heal-steps", type=int, default=8)
    ap.add_argument("--lora-tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--deadline", type=float, default=420, help="seconds; cells after it are recorded as skipped")
    ap.add_argument("--out", default="runs/gpu-e2e")
    args = ap.parse_args(argv)
    cpu = Path(args.bundle) / "cpu.json"
    if cpu.is_file():  # the windows the CPU perplexities were measured on
        cpu = json.loads(cpu.read_text())
        args.ppl_windows, args.ppl_context, args.ppl_continuation = (
            cpu["ppl_windows"], cpu["ppl_context"], cpu["ppl_continuation"])
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    rec = Recorder(out, args, args.deadline)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 perplexities compare with the CPU's fp32
    for name in args.models:
        run_model(rec, name, args, dev, dtype)
    lora_shapes = [(576, 1536), (4096, 14336)] if "tiny" not in args.models else [(64, 172)]
    for d_in, d_out in lora_shapes:
        for n in args.lora_tokens:
            row = {"d_in": d_in, "d_out": d_out, "tokens": n}
            rec.data["lora"].append(row)
            rec.cell(row, "us", lambda d_in=d_in, d_out=d_out, n=n: lora_vs_peft(d_in, d_out, n, dev, dtype))
    rec.save()
    from gpu_table import markdown  # noqa: PLC0415 - the table lives beside, read at the end

    (out / "e2e.md").write_text(markdown(rec.data))
    print(markdown(rec.data))
    return rec.data


if __name__ == "__main__":
    main()
