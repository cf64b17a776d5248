"""Benchmark of the prune stage on SmolLM2-135M (a script, not collected by pytest).

Side by side in one run, at each target sparsity: dense, uniform magnitude, uniform Wanda, OWL (+Wanda)
and DP (+Wanda, RD-pruning ratios). Calibration on ARC-Easy train questions, WikiText-2 dev perplexity
on 512-token windows. The calibration capture, the dense statistics and the distortion curves are
measured once and reused across targets (curves are cached in --cache, so a rerun skips them).

    python tests/bench/prune.py --out runs/bench-prune.json   # ~15 min on 2 idle cores

Prints a table (perplexity, search seconds, additivity rank correlation) and writes JSON results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from adaflex.retrofit.arch import decoder_layers
from adaflex.retrofit.data import calibration_windows, read_text
from adaflex.retrofit.evaluate import perplexity
from adaflex.retrofit.prune.apply import dp_allocation, owl_allocation, targets_from_units
from adaflex.retrofit.prune.calibrate import capture, dense_statistics, prune_sequential
from adaflex.retrofit.prune.config import PruneConfig
from adaflex.retrofit.prune.curves import CurveCache, CurveMeasurer, fingerprint, make_units
from adaflex.retrofit.prune.scores import block_linears
from adaflex.retrofit.restore import load as load_model

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "owl", "dp"],
                    choices=["magnitude", "wanda", "owl", "dp", "dp-depth"])
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 dev windows of 512 tokens to score")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (ARC-Easy train)")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    ap.add_argument("--curve-samples", type=int, default=2, help="calibration windows used for DP curves")
    ap.add_argument("--levels", type=int, default=11, help="K grid points of the DP curves")
    ap.add_argument("--units", default="block", choices=["block", "sublayer", "linear"])
    ap.add_argument("--distortion", default="mse", choices=["mse", "kl"])
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache", default="runs/bench-prune-curves.json", help="curve cache (resumable)")
    ap.add_argument("--out", default="runs/bench-prune.json")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_all = time.perf_counter()

    model, tok = load_model(args.model)
    model.eval()
    text = read_text(DATA / "arc_easy_train.jsonl", "arc")
    windows = calibration_windows(tok, text, args.samples, args.seq_len, seed=0)
    eval_text = (DATA / "wikitext2_dev.txt").read_text()
    layers = decoder_layers(model)
    original = {(b, n): m.weight.detach().clone() for b, blk in enumerate(layers) for n, m in block_linears(blk)}

    def restore() -> None:
        for b, blk in enumerate(layers):
            for n, m in block_linears(blk):
                m.weight.data.copy_(original[(b, n)])

    def measured_sparsity() -> float:
        z = t = 0
        for blk in layers:
            for _, m in block_linears(blk):
                z += m.weight.numel() - int(torch.count_nonzero(m.weight))
                t += m.weight.numel()
        return z / t

    def ppl(label: str) -> float:
        r = perplexity(model, tok, eval_text, seq_len=512, batch_size=4, limit=args.windows, label=label)
        return r.value

    results = {"args": vars(args), "rows": []}
    log("dense perplexity")
    dense = ppl("dense")
    results["dense"] = dense
    log(f"dense: {dense:.3f}")

    t0 = time.perf_counter()
    cap = capture(model, windows, args.batch_size)
    stats = dense_statistics(model, cap)
    t_stats = time.perf_counter() - t0
    log(f"capture + dense statistics: {t_stats:.1f}s")

    measurer = units = cache = None
    t_curves0 = 0.0
    if any(m.startswith("dp") for m in args.methods):
        t0 = time.perf_counter()
        measurer = CurveMeasurer(model, windows[: args.curve_samples], stats, "wanda", None, True, args.distortion)
        units = make_units(model, args.units)
        settings = {"score": "wanda", "pattern": "unstructured", "row": True, "units": args.units,
                    "distortion": args.distortion}
        cache = CurveCache(Path(args.cache), fingerprint(model, windows, windows[: args.curve_samples], settings))
        Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
        t_curves0 = time.perf_counter() - t0  # dense trace of the curve windows

    def evaluate(name: str, s: float, targets, dropped=frozenset(), score="wanda", search_s=0.0, extra=None):
        t0 = time.perf_counter()
        prune_sequential(model, cap, targets, score, None, score == "wanda", set(dropped))
        prune_s = time.perf_counter() - t0
        achieved = measured_sparsity() if not dropped else None
        value = ppl(f"{name}@{s}")
        row = {"method": name, "target": s, "perplexity": value, "search_seconds": search_s,
               "prune_seconds": prune_s, "achieved_sparsity": achieved, **(extra or {})}
        results["rows"].append(row)
        log(f"{name} @ {s}: ppl {value:.2f} (search {search_s:.1f}s, prune {prune_s:.1f}s)")
        restore()
        return row

    for s in args.sparsities:
        uni = [dict.fromkeys((n for n, _ in block_linears(blk)), s) for blk in layers]
        for method in args.methods:
            if method == "magnitude":
                evaluate("uniform magnitude", s, uni, score="magnitude")
            elif method == "wanda":
                evaluate("uniform wanda", s, uni)
            elif method == "owl":
                cfg = PruneConfig(sparsity=s, allocation="owl", owl_lambda=args.owl_lambda, owl_m=args.owl_m)
                t0 = time.perf_counter()
                block_s, _ = owl_allocation(model, stats, cfg)
                t = time.perf_counter() - t0 + t_stats
                tg = [dict.fromkeys((n for n, _ in block_linears(blk)), x)
                      for blk, x in zip(layers, block_s, strict=True)]
                evaluate("owl", s, tg, search_s=t, extra={"block_sparsity": block_s})
            else:
                depth = method == "dp-depth"
                cfg = PruneConfig(sparsity=s, allocation="dp", levels=args.levels, units=args.units,
                                  distortion=args.distortion, allow_drop=depth)
                t0 = time.perf_counter()
                unit_levels, dp, timing = dp_allocation(measurer, units, cfg, cache, seed=0)
                t = time.perf_counter() - t0 + t_stats + t_curves0
                tg, dropped = targets_from_units(model, units, unit_levels)
                add = dp["additivity"]
                evaluate(method, s, tg, dropped, search_s=t,
                         extra={"unit_levels": dp["unit_levels"], "removed": sorted(dropped),
                                "additivity_spearman": add["spearman"], "additivity_ratio": add["chosen_ratio"],
                                "additivity_configs": add["configs"], "predicted": add["chosen_predicted"],
                                "measured": add["chosen_measured"], **timing})

    results["total_seconds"] = time.perf_counter() - t_all
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    table(results)
    log(f"total {results['total_seconds']:.0f}s; results in {args.out}")


def table(results: dict) -> None:
    rows = results["rows"]
    print(f"\nSmolLM2-135M, WikiText-2 dev perplexity ({results['args']['windows']} windows of 512), "
          f"dense {results['dense']:.2f}")
    print(f"| {'method':<17} | {'sparsity':>8} | {'achieved':>8} | {'perplexity':>10} | {'search s':>8} | "
          f"{'additivity ρ':>12} |")
    print(f"|{'-' * 19}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 10}|{'-' * 14}|")
    for r in rows:
        rho = r.get("additivity_spearman")
        ach = r.get("achieved_sparsity")
        print(f"| {r['method']:<17} | {r['target']:>8.2f} | {ach if ach is None else f'{ach:.4f}':>8} | "
              f"{r['perplexity']:>10.2f} | {r['search_seconds']:>8.1f} | "
              f"{'' if rho is None else f'{rho:.2f}':>12} |")
    by = {(r["method"], r["target"]): r["perplexity"] for r in rows}
    for s in results["args"]["sparsities"]:
        w, o, d = by.get(("uniform wanda", s)), by.get(("owl", s)), by.get(("dp", s))
        if None not in (w, d):
            print(f"at {s:.0%}: dp / uniform wanda = {d / w:.3f}" + (f", dp / owl = {d / o:.3f}" if o else ""))


if __name__ == "__main__":
    main()
