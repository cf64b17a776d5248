"""Benchmark of the width stage against drop on SmolLM2-135M (a script, not collected by pytest).

At each share f of the decoder blocks' linear MACs to remove, side by side in one run: drop (ShortGPT, k =
round(f·L) blocks), uniform width, DP width and evolutionary width, the widths targeting k/L so that every
method removes the same MACs as drop. Calibration on ARC-Easy train questions; WikiText-2 dev perplexity on
512-token windows; ARC-Easy validation accuracy; the measured flops_ratio (evaluate.cost_figures); prefill
and decode tokens/s (best of --repeats) against dense; the wall time of each method (search + apply).
The importance statistics and the DP's distortion curves are measured once and shared by all targets; the
evolution gets as many evaluations as the DP's curves took (both counts are printed).

    OMP_NUM_THREADS=2 python tests/bench/width.py --targets 0.25 --out runs/bench-width.json

Recipe equivalent of one row: recipes/bench/smollm2-width.yaml.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from adaflex.retrofit import restore
from adaflex.retrofit.arch import decoder_layers, new_cache, reference_of
from adaflex.retrofit.data import calibration_windows, read_mc, read_text
from adaflex.retrofit.drop.apply import block_influence, choose, remove_blocks
from adaflex.retrofit.evaluate import cost_figures, multiple_choice, perplexity, probe_ids
from adaflex.retrofit.heal.apply import trained_weights
from adaflex.retrofit.heal.config import HealConfig
from adaflex.retrofit.heal.train import TopKTeacher, heal, steps_for
from adaflex.retrofit.width.apply import apply as width_apply
from adaflex.retrofit.width.apply import narrow_plan
from adaflex.retrofit.width.importance import collect, scores
from adaflex.retrofit.width.parts import dims_of
from adaflex.retrofit.width.plan import WidthPlan
from adaflex.retrofit.width.search import (
    Measurer,
    dp_picks,
    evolve,
    make_units,
    measure_curves,
    picks_of,
    widths_of,
)
from adaflex.retrofit.width.shapes import uniform_width

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def _timed(model, ids: torch.Tensor, prefill: int, context: int, steps: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    model(input_ids=ids[:, :prefill], use_cache=False, logits_to_keep=1)
    t_pre = time.perf_counter() - t0
    cache = new_cache(model)
    out = model(input_ids=ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, cache=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return t_pre, time.perf_counter() - t0


def speed(model, dense, ids: torch.Tensor, prefill: int, context: int, steps: int, repeats: int) -> dict:
    """Tokens/s, best of `repeats`, of one forward of `prefill` tokens and of `steps` greedy single-token
    steps through the cache after a `context`-token prompt; the dense model is timed in alternation with
    `model` (after a warm-up of each) so that the drifting load of a shared machine hits both alike."""
    best = {m: [math.inf, math.inf] for m in ("model", "dense")}
    for m in (model, dense):
        _timed(m, ids, prefill, context, 2)
    for _ in range(repeats):
        for name, m in (("model", model), ("dense", dense)):
            t = _timed(m, ids, prefill, context, steps)
            best[name] = [min(a, b) for a, b in zip(best[name], t, strict=True)]
    return {"prefill_tok_s": prefill / best["model"][0], "decode_tok_s": steps / best["model"][1],
            "prefill_x": best["dense"][0] / best["model"][0], "decode_x": best["dense"][1] / best["model"][1]}


def evaluate(model, dense, tok, args, eval_text: str, items, probe, speed_ids) -> dict:
    ppl = perplexity(model, tok, eval_text, seq_len=512, batch_size=2, limit=args.windows, label="ppl")
    arc = multiple_choice(model, tok, items, batch_size=16, label="arc")
    cost = cost_figures(model, probe)
    out = {"ppl": ppl.value, "arc_acc": arc.value, "arc_acc_norm": arc.extra["acc_norm"],
           "flops_ratio": cost["flops_ratio"], "linear_params": sum(
               m.weight.numel() for blk in decoder_layers(model) for m in blk.modules()
               if isinstance(m, torch.nn.Linear))}
    out.update(speed(model, dense, speed_ids, args.prefill, args.context, args.decode_steps, args.repeats))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.15, 0.25, 0.35])
    ap.add_argument("--methods", nargs="+", default=["drop", "uniform", "dp", "evo"],
                    help="drop, or a width allocation (uniform: attention and FFN alike; uniform-mlp: FFN only; "
                         "dp; evo) with optional suffixes -wanda (importance) and -refit (least squares)")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 dev windows of 512 tokens")
    ap.add_argument("--arc-limit", type=int, default=200, help="ARC-Easy validation questions")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (ARC-Easy train)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--curve-samples", type=int, default=1, help="windows the DP / evolution distortions use")
    ap.add_argument("--curve-len", type=int, default=128, help="tokens of each of those windows")
    ap.add_argument("--levels", type=int, default=10)
    ap.add_argument("--max-removed", type=float, default=0.9)
    ap.add_argument("--multiple", type=int, default=32)
    ap.add_argument("--kv-groups", action="store_true", help="whole KV groups may go")
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--heal-tokens", type=int, default=0, help="after each row, heal it (the quickstart's heal: "
                    "norms + last 3 blocks, top-64 KL to dense) on the calibration windows and evaluate again")
    ap.add_argument("--heal-targets", type=float, nargs="*", help="targets whose rows are healed (default: all)")
    ap.add_argument("--heal-methods", nargs="*", help="methods whose rows are healed (default: all)")
    ap.add_argument("--out", default="runs/bench-width.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_all = time.perf_counter()

    dense, tok = restore.load(args.model)
    reference_of(dense)
    L = len(decoder_layers(dense))
    dims, parts = dims_of(dense, "bench")
    windows = calibration_windows(tok, read_text(DATA / "arc_easy_train.jsonl", "arc"), args.samples, args.seq_len,
                                  seed=0)
    eval_text = (DATA / "wikitext2_dev.txt").read_text()
    items = read_mc(DATA / "arc_easy_validation.jsonl", "arc", args.arc_limit)
    probe = probe_ids(tok, eval_text)
    speed_ids = tok(eval_text[:20000], return_tensors="pt").input_ids[:, : max(args.prefill, args.context)]

    rows = []
    log("dense")
    t0 = time.perf_counter()
    base = evaluate(dense, dense, tok, args, eval_text, items, probe, speed_ids)
    rows.append({"method": "dense", "target": 0.0, **base, "seconds": 0.0, "eval_seconds": time.perf_counter() - t0})

    t0 = time.perf_counter()
    bi = block_influence(dense, windows, show_progress=False) if "drop" in args.methods else None
    t_bi = time.perf_counter() - t0
    for method in args.methods:
        if method != "drop" and method.split("-")[0] not in ("uniform", "dp", "evo"):
            ap.error(f"--methods: unknown method '{method}'")
    need_refit = any("refit" in m for m in args.methods)
    t0 = time.perf_counter()
    # importance and refit learn on the windows the DP / evolution distortions are not measured on
    st = collect(dense, windows[args.curve_samples:], dims, parts, 8, gram=need_refit)
    imp = {"activation": scores(dense, st, "activation", dims, parts)}
    if any("wanda" in m for m in args.methods):
        imp["wanda"] = scores(dense, st, "wanda", dims, parts)
    t_imp = time.perf_counter() - t0

    blocks = {f: int(math.floor(f * L + 0.5)) for f in args.targets}
    fracs = {f: blocks[f] / L for f in args.targets}
    unis = {(f, p): uniform_width(dims, fracs[f], p, args.kv_groups, args.multiple)
            for f in args.targets for p in ("both", "mlp")}
    units = make_units(dims, L, "both", args.kv_groups, args.levels, args.max_removed, args.multiple,
                       list(unis.values()))
    total = dims.block_macs * L
    searchers, curves, search_info = {}, {}, {}

    def measurer(kind: str, refit: bool) -> Measurer:
        key = (kind, refit)
        if key not in searchers:
            mlp_s, head_s = imp[kind]
            grams = (st.gram_mlp, st.gram_attn) if refit else None
            searchers[key] = Measurer(dense, windows[: args.curve_samples, : args.curve_len], dims, parts, mlp_s,
                                      head_s, "kl", grams)
        return searchers[key]

    def dp_curves(kind: str, refit: bool):
        key = (kind, refit)
        if key not in curves:
            m = measurer(kind, refit)
            e0, b0, t = m.evaluations, m.block_forwards, time.perf_counter()
            curves[key] = measure_curves(m, units)
            search_info[key] = {"evaluations": m.evaluations - e0, "block_forwards": m.block_forwards - b0,
                                "seconds": time.perf_counter() - t}
        return curves[key], search_info[key]

    heal_cfg = HealConfig(train=["norms", "last_blocks"], last_blocks=3, tokens=max(args.heal_tokens, 1),
                          batch_size=8, top_k=64, weights_lr=2e-4, warmup=2)
    teacher = TopKTeacher(dense, heal_cfg.top_k, heal_cfg.temperature)  # shared: same windows for every row

    def healed(model) -> dict:
        """The same healing for every row: trains `model` in place, returns the heal's own figures."""
        t = time.perf_counter()
        groups = {"fast": {}, "slow": {n: model.get_parameter(n) for n in trained_weights(model, heal_cfg)}}
        out = heal(model, windows, groups, heal_cfg, teacher, steps=steps_for(heal_cfg, windows.shape[1]), seed=0)
        model.eval()
        return {"heal_seconds": time.perf_counter() - t, "heal_loss": [out["train_loss_first"], out["train_loss_last"]]}

    for f in args.targets:
        for method in args.methods:
            log(f"{method} at {f:g} (k={blocks[f]} blocks, {fracs[f]:.4f} of block MACs)")
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            info: dict = {}
            if method == "drop":
                removed = choose(bi, blocks[f], [])
                remove_blocks(model, [i for i in range(L) if i not in removed])
                info = {"removed_blocks": removed, "removed": blocks[f] / L}
                prep = t_bi
            else:
                kind = "wanda" if "wanda" in method else "activation"
                refit = "refit" in method
                mlp_s, head_s = imp[kind]
                start = picks_of(units, [unis[f, "mlp" if method.startswith("uniform-mlp") else "both"]] * L)
                prep = t_imp
                if method.startswith("uniform"):
                    picks = start
                elif method.startswith("dp"):
                    cv, ci = dp_curves(kind, refit)
                    picks, predicted = dp_picks(units, cv, fracs[f], total)
                    info = {"evaluations": ci["evaluations"], "block_forwards": ci["block_forwards"],
                            "predicted": predicted, "curve_seconds": ci["seconds"]}
                    prep += ci["seconds"]
                else:
                    m = measurer(kind, refit)
                    n = sum(len(u.options) - 1 for u in units)
                    e0, b0 = m.evaluations, m.block_forwards
                    picks, _, trace = evolve(m, units, start, (1 - fracs[f]) * total, n, args.offspring, 0)
                    info = {"evaluations": m.evaluations - e0, "block_forwards": m.block_forwards - b0,
                            "trace": trace[-1]}
                info["kl"] = measurer(kind, refit).config(units, picks)  # outside the search's count
                widths = widths_of(units, picks, L)
                plan, tensors = narrow_plan(dense, dims, widths, mlp_s, head_s, st if refit else None)
                width_apply(model, WidthPlan.model_validate(plan), tensors)
                info.update({"removed": plan["removed"], "widths": [list(w.to_dict().values()) for w in widths]})
            seconds = time.perf_counter() - t0 + prep
            t1 = time.perf_counter()
            res = evaluate(model, dense, tok, args, eval_text, items, probe, speed_ids)
            rows.append({"method": method, "target": f, "blocks": blocks[f], **res, "seconds": seconds,
                         "eval_seconds": time.perf_counter() - t1, **info})
            log(f"  ppl {res['ppl']:.2f} arc {res['arc_acc']:.3f} flops {res['flops_ratio']:.4f} "
                f"prefill x{res['prefill_x']:.2f} decode x{res['decode_x']:.2f}")
            if args.heal_tokens and (args.heal_targets is None or f in args.heal_targets) \
                    and (args.heal_methods is None or method in args.heal_methods):
                log(f"  heal {method} at {f:g}: {args.heal_tokens} tokens")
                h = healed(model)
                t1 = time.perf_counter()
                res = evaluate(model, dense, tok, args, eval_text, items, probe, speed_ids)
                rows.append({"method": f"{method}+heal", "target": f, "blocks": blocks[f], **res, **h,
                             "seconds": seconds + h["heal_seconds"], "eval_seconds": time.perf_counter() - t1,
                             **{k: v for k, v in info.items() if k in ("removed", "kl", "evaluations",
                                                                     "block_forwards")}})
                log(f"  healed: ppl {res['ppl']:.2f} arc {res['arc_acc']:.3f} (heal {h['heal_seconds']:.0f} s)")
            del model
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))

    print(table(rows, base, args, time.perf_counter() - t_all))


def table(rows: list[dict], base: dict, args, wall: float) -> str:
    lines = [f"SmolLM2-135M, WikiText-2 dev ppl ({args.windows}×512 tokens), ARC-Easy val acc / acc_norm "
             f"({args.arc_limit} questions), {args.threads} threads, speed best of {args.repeats} "
             f"(prefill {args.prefill} tokens, decode {args.decode_steps} steps after {args.context})", "",
             "| removed | method | blocks | ppl | ARC acc | acc_norm | flops_ratio | ideal speed-up | prefill × | "
             "decode × | KL (curve windows) | evaluations | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl']:.4f}" if "kl" in r else "–"
        ev = f"{r['evaluations']} ({r['block_forwards']} blocks)" if "evaluations" in r else "–"
        lines.append(
            f"| {r.get('removed', 0.0):.3f} | {r['method']} | "
            f"{r.get('blocks', '–')} | {r['ppl']:.2f} | {r['arc_acc']:.3f} | {r['arc_acc_norm']:.3f} | "
            f"{r['flops_ratio']:.4f} | {1 / r['flops_ratio']:.3f} | "
            f"{r['prefill_x']:.3f} | {r['decode_x']:.3f} | "
            f"{kl} | {ev} | {r['seconds']:.0f} |")
    lines.append(f"\ndense: prefill {base['prefill_tok_s']:.0f} tok/s, decode {base['decode_tok_s']:.1f} tok/s; "
                 f"total wall time {wall:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
