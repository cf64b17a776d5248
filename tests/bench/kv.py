"""KV budgets benchmark on SmolLM2-135M (a script, not collected by pytest).

    OMP_NUM_THREADS=2 nice python tests/bench/kv.py [--contexts 1024,2048] [--budgets 0.1,0.25,0.5] [--windows 4]
        [--continuation 128] [--trials 10] [--depths 0.1,0.3,0.5,0.7,0.9] [--grid] [--no-passkey]
        [--configs POLICY/ALLOCATION,...] [--variants NAME:key=value/...;...] [--out runs/bench-kv.json]

For each context length: continuation perplexity on WikiText-2 dev (prefill C tokens through the cache,
compressed to the budget, then score the next `--continuation` tokens; `--windows` windows in one batch) and
passkey accuracy at `--depths` (query-aware: question inside the prompt; query-agnostic: context compressed
before the question arrives), for StreamingLLM, SnapKV, PyramidKV, CAKE, PrefixKV, H2O, mix (rms heavy hitters) +
CAKE (the kv recipe's default, recipes/bench/smollm2-kv.yaml), the same with a searched plan and with int8 storage
at every budget, plus the full cache (`--grid`: every policy x allocation, plus the `--variants`).

Cost: every prompt is prefilled once with a full cache and replayed into every budgeted cache (replay.py):
compression happens after each layer's attention, so this is exactly what a live prefill keeps (a test checks
it), peak KV bytes included. A passkey prompt (context + question) is prefilled once for both protocols: the
query-agnostic replay uses the record of its context prefix, taken from the same forward (also tested). The
passkey prompts of a context length go in as few batches as `--batch` and `--batch-tokens` allow. What is left
per row is its replay, one continuation forward and a few greedy steps; the report's `times` gives wall and CPU
seconds per part.

`kv_bytes_ratio` is measured from the tensors the cache holds after the prefill; `peak_kv_mb` is the most KV
the cache held at once during the prefill (a live prefill also holds the layer being computed, which the
replay counts the same way); `peak_rss_mb` is the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "wikitext2_dev.txt"

POLICIES = ["streaming", "snapkv", "cake", "h2o", "mix"]
ALLOCATIONS = ["uniform", "pyramid", "cake", "prefixkv"]
# StreamingLLM, SnapKV, PyramidKV, CAKE, PrefixKV, H2O
CONFIGS = ["streaming/uniform", "snapkv/uniform", "snapkv/pyramid", "cake/cake", "snapkv/prefixkv", "h2o/uniform"]
# adaflex's default (recipes/kv.yaml: mix with rms heavy hitters + CAKE), its searched plan, and the int8 row
VARIANTS = ("mix+cake:policy=mix/allocation=cake/stat=rms;mix+searched:policy=mix/allocation=searched/stat=rms;"
            "mix+int8:policy=mix/allocation=cake/stat=rms/storage=int8")
_CONV = {"recent": float, "gamma": float, "tau1": float, "tau2": float, "beta": float, "storage": str, "stat": str,
         "heads": str, "value_norm": lambda v: v.lower() in ("1", "true", "yes")}


def stage_kwargs(kw: dict) -> dict:
    """KVConfig keyword arguments from a variant's key=value strings (numbers, flags)."""
    return {k: _CONV.get(k, int)(v) if isinstance(v, str) else v for k, v in kw.items()}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


TIMES: dict[str, list[float]] = {}  # part -> [wall seconds, CPU seconds of this process]


@contextmanager
def clock(part: str):
    """Add the wall and CPU time of the block to TIMES[part] (CPU time estimates an idle machine's cost)."""
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        t = TIMES.setdefault(part, [0.0, 0.0])
        t[0] += time.perf_counter() - w
        t[1] += time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default="1024,2048")
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="policy/allocation pairs (without --grid)")
    ap.add_argument("--grid", action="store_true", help="every --policies x --allocations pair instead")
    ap.add_argument("--searched", default="mix", help="with --grid: policies that also get the searched allocation")
    ap.add_argument("--windows", type=int, default=4, help="perplexity windows per context length (one batch)")
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--trials", type=int, default=10, help="passkey trials per protocol and context length")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--batch", type=int, default=10, help="passkey prompts per prefill (both protocols share it)")
    ap.add_argument("--batch-tokens", type=int, default=10240,
                    help="at most this many passkey prompt tokens per prefill (bounds the recorded KV in memory)")
    ap.add_argument("--calibration", type=int, default=4, help="calibration windows of the offline plans")
    ap.add_argument("--cal-len", type=int, default=1024)
    ap.add_argument("--search-trials", type=int, default=10, help="searched: coordinate-search evaluations")
    ap.add_argument("--gains-budget", type=float, default=0.25,
                    help="searched: the budget at which each layer's gain is measured (once, for every budget)")
    ap.add_argument("--kernel", type=int, default=15, help="pooling width (15 keeps 5-digit spans whole)")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=float, default=0.0)
    ap.add_argument("--variants", default=VARIANTS,
                    help="extra rows: name:key=value/key=value;... (default: adaflex's default, searched, int8)")
    ap.add_argument("--no-passkey", action="store_true")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="intra-op threads (default: OMP_NUM_THREADS, else 1)")
    ap.add_argument("--out", default="runs/bench-kv.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from adaflex.retrofit import restore
    from adaflex.retrofit.data import calibration_windows
    from adaflex.retrofit.evaluate.retrieval import build_prompt
    from adaflex.retrofit.kv.apply import (
        CalibrationObjective,
        attention_profiles,
        cake_plan,
        install,
        measure_gains,
        prefixkv_plan,
        search_plan,
        spec_from,
    )
    from adaflex.retrofit.kv.config import KVConfig
    from adaflex.retrofit.kv.replay import record_prefill, replay

    t_start = time.perf_counter()
    model, tok = restore.load(a.model)
    n = model.config.num_hidden_layers
    text = DATA.read_text()
    ids = tok(text, add_special_tokens=False).input_ids
    base = dict(kernel=a.kernel, window=a.window, sinks=a.sinks, recent=a.recent)
    install(model, spec_from(KVConfig(budget=1.0, **base), n))
    budgets = [float(b) for b in a.budgets.split(",")]
    contexts = [int(c) for c in a.contexts.split(",")]
    depths = [float(d) for d in a.depths.split(",")]

    if a.grid:  # every policy x allocation
        configs = [(p, al, base) for p in a.policies.split(",") for al in a.allocations.split(",")]
        configs += [(p, "searched", base) for p in filter(None, a.searched.split(","))]
    else:  # one row per published method, ours, and the quantization row
        configs = [(p, al, base) for p, _, al in (c.partition("/") for c in filter(None, a.configs.split(",")))]
    for item in filter(None, a.variants.split(";")):
        name, _, body = item.partition(":")
        kw = dict(base)
        for pair in filter(None, body.split("/")):
            k, v = pair.split("=")
            kw[k] = v
        configs.append((name, kw.pop("allocation", "uniform"), kw))

    # ---- offline plans (prefixkv, searched) on calibration windows ----
    plans: dict = {}
    need_plans = any(al in ("prefixkv", "searched") for _, al, _ in configs)
    if need_plans:
        with clock("offline plans"):
            # calibration text never overlaps the perplexity windows: it is drawn from the text after them
            held = a.windows * (max(contexts) + a.continuation)
            cal = calibration_windows(tok, text, a.calibration, a.cal_len, 0, str(DATA), skip=held)
            curves, prefs = attention_profiles(model, cal, a.window)
            for b in budgets:
                plans[("prefixkv", b)] = prefixkv_plan(curves, b, a.sinks + a.window)
                plans[("cake_avg", b)] = cake_plan(prefs, b, a.cal_len, a.sinks + a.window)
            log(f"profiles done ({time.perf_counter() - t_start:.0f}s)")
            objectives = {}  # one recorded prefill of the calibration windows per policy, shared by the budgets
            for pol, al, kw in configs:
                if al != "searched":
                    continue
                for b in budgets:
                    cfg = KVConfig(budget=b, policy=kw.get("policy", pol) if pol not in POLICIES else pol,
                                   trials=a.search_trials,
                                   **stage_kwargs({k: v for k, v in kw.items() if k != "policy"}))
                    if cfg.policy not in objectives:
                        objectives[cfg.policy] = CalibrationObjective(model, cal, cfg)
                    obj = objectives[cfg.policy]
                    obj.cfg, obj.calls = cfg, 0
                    if (cfg.policy, "gains") not in plans and cfg.layer_gains:  # measured once, at --gains-budget
                        obj.cfg = cfg.model_copy(update={"budget": a.gains_budget})
                        plans[(cfg.policy, "gains")] = measure_gains(obj, obj.cfg, a.gains_budget, n)
                        obj.cfg = cfg
                    best, found = search_plan(obj, cfg, n, b, plans[("cake_avg", b)], plans[("prefixkv", b)],
                                              gains=plans.get((cfg.policy, "gains")))
                    plans[(pol, "searched", b)] = best
                    if "layer_gains" in found:
                        top = sorted(range(n), key=lambda i: -found["layer_gains"][i])[:6]
                        log("layer gains: " + ", ".join(f"{i}: {found['layer_gains'][i]:.4f}" for i in top))
                    if "head_gains" in found:
                        g = np.asarray(found["head_gains"])
                        top = np.argsort(-g, axis=None)[:8]
                        log("head gains: " + ", ".join(f"{i // g.shape[1]}.{i % g.shape[1]}: {g.flat[i]:.4f}"
                                                       for i in top))
                    log(f"searched {pol} @ {b}: start {found['search_start']} "
                        f"{found['candidates_nll'][found['search_start']]:.4f} -> {found['searched_nll']:.4f} "
                        f"({obj.calls} calls)")
            install(model, spec_from(KVConfig(budget=1.0, **base), n))

    def make_spec(pol, al, kw, b):
        kw = dict(kw)
        policy = kw.pop("policy", pol if pol in POLICIES else "snapkv")
        cfg = KVConfig(budget=b, policy=policy, allocation=al if al != "searched" else "uniform", **stage_kwargs(kw))
        fr = None
        if al == "prefixkv":
            fr = plans[("prefixkv", b)]
        elif al == "searched":
            fr = plans[(pol, "searched", b)]
        return spec_from(cfg, n, fr, model)  # per layer, or per KV head

    rows = []
    full_spec = spec_from(KVConfig(budget=1.0, **base), n)
    entries = [("full", "-", base, 1.0)] + [(p, al, kw, b) for b in budgets for p, al, kw in configs]

    for C in contexts:
        span = C + a.continuation
        starts = list(range(0, len(ids) - span, span))[: a.windows]
        stats = {i: {"nll": 0.0, "cnt": 0, "kv": 0.0, "peak": 0, "pk_aware": 0, "pk_agn": 0,
                     "by_depth": {}} for i in range(len(entries))}
        full_bytes = None
        # perplexity: all windows in one batch (as `adaflex eval` batches them); allocations are per layer,
        # shared by the rows of a batch
        x = torch.tensor([ids[s:s + span] for s in starts])
        with clock("perplexity prefill"):
            rec = record_prefill(model, x[:, :C], window=a.window)
        cont = x[:, C:]
        full_bytes = sum(k.numel() * k.element_size() * 2 for k in rec.keys)
        for i, (pol, al, kw, b) in enumerate(entries):
            spec = full_spec if pol == "full" else make_spec(pol, al, kw, b)
            with clock("replay"):
                cache = replay(spec, rec)
            st = stats[i]
            st["kv"] = cache.stored_bytes() / full_bytes
            st["peak"] = cache.peak_bytes / len(starts)  # per sequence
            cache.frozen = True  # eviction after the continuation's attention cannot change its logits: skip it
            with torch.no_grad(), clock("continuation"):
                out = model(input_ids=cont, cache=cache, use_cache=True)
            logits = torch.cat([rec.logits[:, None], out.logits[:, :-1].float()], 1)
            st["nll"] += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), cont.flatten(),
                                                                  reduction="sum"))
            st["cnt"] += cont.numel()
        del rec
        log(f"C={C} perplexity, {len(starts)} windows ({time.perf_counter() - t_start:.0f}s)")
        # passkey: one prefill of context + question per batch; the query-aware protocol replays all of it, the
        # query-agnostic one replays the record of the context alone (its prefix, from the same forward)
        if not a.no_passkey:
            import random

            rng = random.Random(0)
            cases = []
            for t in range(a.trials):
                key = str(rng.randint(10000, 99999))
                d = depths[t % len(depths)]
                st0 = rng.randint(0, len(ids) - C - 1)
                ctx, q = build_prompt(tok, ids[st0:st0 + C], C, d, key)
                cases.append((d, key, ctx, q))
            steps = len(tok(" 12345", add_special_tokens=False).input_ids) + 1
            batch = max(1, min(a.batch, a.batch_tokens // C))
            for c0 in range(0, len(cases), batch):
                chunk = cases[c0:c0 + batch]
                ctx = torch.tensor([c[2] for c in chunk])
                q = torch.tensor([c[3] for c in chunk])
                with clock("passkey prefill"):
                    rec_aware, rec_agn = record_prefill(model, torch.cat([ctx, q], 1), window=a.window,
                                                        prefix=ctx.shape[1])
                for i, (pol, al, kw, b) in enumerate(entries):
                    spec = full_spec if pol == "full" else make_spec(pol, al, kw, b)
                    for agnostic, rec in ((False, rec_aware), (True, rec_agn)):
                        with clock("replay"):
                            cache = replay(spec, rec)
                        with torch.no_grad(), clock("passkey decode"):
                            if agnostic:
                                cache.frozen = True
                                out = model(input_ids=q, cache=cache, use_cache=True, logits_to_keep=1)
                                logit = out.logits[:, -1]
                            else:
                                logit = rec.logits
                            toks = []
                            for s in range(steps):
                                nxt = logit.argmax(-1)
                                toks.append(nxt)
                                if s + 1 < steps:
                                    logit = model(input_ids=nxt[:, None], cache=cache, use_cache=True).logits[:, -1]
                        gen = torch.stack(toks, 1)
                        for (d, key, _, _), row in zip(chunk, gen, strict=True):
                            ans = tok.decode(row.tolist(), skip_special_tokens=True)
                            digits = "".join(ch for ch in ans.strip().split(" ")[0] if ch.isdigit()) if ans else ""
                            ok = int(digits.startswith(key))
                            stats[i]["pk_agn" if agnostic else "pk_aware"] += ok
                            if not agnostic:
                                bd = stats[i]["by_depth"].setdefault(str(d), [0, 0])
                                bd[0] += ok
                                bd[1] += 1
                del rec_aware, rec_agn
                log(f"C={C} passkey {c0 + len(chunk)}/{len(cases)} ({time.perf_counter() - t_start:.0f}s)")
        log(f"C={C} done; CPU s so far: " + ", ".join(f"{k} {c:.0f}" for k, (_, c) in TIMES.items()))
        for i, (pol, al, kw, b) in enumerate(entries):
            st = stats[i]
            rows.append({"context": C, "budget": b, "policy": pol, "allocation": al,
                         "perplexity": math.exp(st["nll"] / st["cnt"]), "kv_bytes_ratio": st["kv"],
                         "peak_kv_mb": st["peak"] / 2**20,
                         "passkey": None if a.no_passkey else st["pk_aware"] / a.trials,
                         "passkey_agnostic": None if a.no_passkey else st["pk_agn"] / a.trials,
                         "by_depth": {d: h / m for d, (h, m) in st["by_depth"].items()},
                         "variant": {k: v for k, v in kw.items() if base.get(k) != v} or None})
        full = next(r for r in rows if r["context"] == C and r["policy"] == "full")
        for r in rows:
            if r["context"] == C:
                r["ppl_ratio"] = r["perplexity"] / full["perplexity"]
                r["passkey_ratio"] = (r["passkey"] / full["passkey"]) if full.get("passkey") else None
    elapsed = time.perf_counter() - t_start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = {k: {"wall_s": round(w, 1), "cpu_s": round(c, 1)} for k, (w, c) in TIMES.items()}
    report = {"args": vars(a), "seconds": elapsed, "cpu_seconds": time.process_time(), "peak_rss_mb": peak_rss,
              "times": times, "rows": rows,
              # per-layer or per-head plans; the gains entry is (layer gains, head gains or None)
              "plans": {"/".join(map(str, k)): [None if x is None else np.round(x, 5).tolist() for x in v]
                        if isinstance(v, tuple) else np.round(v, 5).tolist() for k, v in plans.items()}}
    print("| ctx | budget | policy | allocation | ppl | ×full | passkey | agnostic | kv_bytes_ratio | peak KV MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pk = "—" if r["passkey"] is None else f"{r['passkey']:.2f}"
        ag = "—" if r["passkey_agnostic"] is None else f"{r['passkey_agnostic']:.2f}"
        print(f"| {r['context']} | {r['budget']:.2f} | {r['policy']} | {r['allocation']} | {r['perplexity']:.2f} | "
              f"{r['ppl_ratio']:.3f} | {pk} | {ag} | {r['kv_bytes_ratio']:.3f} | {r['peak_kv_mb']:.1f} |")
    print(f"total {elapsed:.0f}s wall, {time.process_time():.0f}s CPU, peak RSS {peak_rss:.0f} MB; "
          + ", ".join(f"{k} {v['wall_s']:.0f}s/{v['cpu_s']:.0f}s CPU" for k, v in times.items()))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
