"""Layer-routes benchmark on SmolLM2-135M (a script, not collected by pytest).

    nice python tests/bench/routes.py [--examples 48 --simulations 24 --arc 570 --hellaswag 1000 ...]

MCTS labels on ARC-Easy/Challenge train (recipes/bench/smollm2-routes.yaml, sizes overridable), routers,
then dense, `drop` (ShortGPT, same mean executed blocks), random skipping (same budget) and routes on
ARC-Easy validation and HellaSwag dev: acc, acc_norm, mean executed blocks; prefill and decode tokens/s
of all four measured side by side (interleaved, best of --repeats), with the ideal speed-up from the
executed blocks (methods.md: prefill L/E with logits at one position; decode by linear MACs with the head).
Labels resume from --out/state; results go to --out/report.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from adaflex.retrofit import registry, restore
from adaflex.retrofit.arch import reference_of
from adaflex.retrofit.data import read_mc
from adaflex.retrofit.drop.apply import block_influence, choose, remove_blocks
from adaflex.retrofit.evaluate import choice_logliks, mc_scores
from adaflex.retrofit.evaluate.mc import encode_pair
from adaflex.retrofit.recipe import load_recipe
from adaflex.retrofit.routes.runtime import RandomPolicy, install, runtime_of
from adaflex.retrofit.stage import StageContext

ROOT = Path(__file__).resolve().parents[2]


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mc_eval(model, tok, items, label):
    rt = runtime_of(model)
    if rt is not None:
        rt.decided_rows = rt.decided_blocks = 0
    t0 = time.perf_counter()
    ll, tokens = choice_logliks(model, tok, items, batch_size=16, label=label, show_progress=False)
    sec = time.perf_counter() - t0
    s = mc_scores(items, ll)
    L = reference_of(model)["num_layers"]
    executed = (rt.decided_blocks / rt.decided_rows) if rt is not None and rt.decided_rows else len(
        model.get_decoder().layers)
    return {"acc": s["acc"], "acc_norm": s["acc_norm"], "n": len(items), "executed_mean": executed, "L": L,
            "seconds": sec, "tokens_per_s": tokens / sec}


@torch.no_grad()
def speed(systems: dict, prompts: list[torch.Tensor], decode: int, repeats: int):
    """Best-of-`repeats` prefill and decode time per prompt, systems interleaved prompt by prompt."""
    best = {name: [[float("inf"), float("inf")] for _ in prompts] for name in systems}
    executed = {name: [0] * len(prompts) for name in systems}
    for _ in range(repeats):
        for i, x in enumerate(prompts):
            for name, model in systems.items():
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
                t0 = time.perf_counter()
                out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
                t1 = time.perf_counter()
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(decode):
                    out = model(input_ids=tok, cache=cache, use_cache=True)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                t2 = time.perf_counter()
                b = best[name][i]
                b[0], b[1] = min(b[0], t1 - t0), min(b[1], t2 - t1)
                routes = getattr(cache, "adaflex_routes", None)
                executed[name][i] = int(routes.sum()) if routes is not None else len(model.get_decoder().layers)
    ntok = sum(p.shape[1] for p in prompts)
    res = {}
    for name in systems:
        pre = sum(b[0] for b in best[name])
        dec = sum(b[1] for b in best[name])
        res[name] = {"prefill_tok_s": ntok / pre, "decode_tok_s": decode * len(prompts) / dec,
                     "executed": executed[name]}
    return res


def ideal(model, executed: list[int], prompts):
    ref = reference_of(model)
    L, blk, head = ref["num_layers"], ref["block_linear_params"], ref["hidden_size"] * ref["vocab_size"]
    pre = sum(p.shape[1] * L for p in prompts) / sum(p.shape[1] * e for p, e in zip(prompts, executed, strict=True))
    dec = sum(L * blk + head for _ in executed) / sum(e * blk + head for e in executed)
    return pre, dec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes/bench/smollm2-routes.yaml"))
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--simulations", type=int, default=None)
    ap.add_argument("--max-executed", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="extra recipe override KEY=VALUE")
    ap.add_argument("--arc", type=int, default=570, help="ARC-Easy validation items")
    ap.add_argument("--hellaswag", type=int, default=None,
                    help="HellaSwag dev items (first N; default 1000, none with --router-seeds)")
    ap.add_argument("--speed-prompts", type=int, default=6)
    ap.add_argument("--decode", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs/bench-routes"))
    ap.add_argument("--speed-only", action="store_true",
                    help="skip the accuracy runs: baselines at the routes' mean executed blocks on --arc items")
    ap.add_argument("--router-seeds", default="",
                    help="comma-separated router seeds: train routers with each on the same (resumed) labels, "
                         "dial each to the budget and report ARC-Easy (and --hellaswag items if given) per seed; "
                         "no baselines, no speed")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    sets = list(a.set)
    if a.examples:
        sets.append(f"routes.examples={a.examples}")
    if a.simulations:
        sets.append(f"routes.simulations={a.simulations}")
    if a.max_executed:
        sets.append(f"routes.max_executed={a.max_executed}")
    recipe = load_recipe(a.recipe, sets)
    (_method, cfg), = recipe.stage_items()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = restore.load(recipe.model)
    model.eval()
    reference_of(model)
    L = len(model.get_decoder().layers)

    if a.router_seeds:
        return seed_spread(a, model, tok, out, sets)

    # ---- fit routes (labels resume from out/state) ----
    t0 = time.perf_counter()
    impl = registry.get("routes")
    ctx = StageContext(model, tok, recipe, 0, out / "state")
    fitted = impl.fit(ctx, cfg)
    fit_s = time.perf_counter() - t0
    log(f"fit {fit_s:.0f}s: {json.dumps({k: v for k, v in fitted.metrics.items() if k != 'label_class_share'})}")
    routed = copy.deepcopy(model)
    impl.apply(routed, impl.read_plan(fitted.plan, "routes"), fitted.tensors)

    arc = read_mc(ROOT.parent / "shared/data/arc_easy_validation.jsonl", limit=a.arc)
    hs = read_mc(ROOT.parent / "shared/data/hellaswag_dev.jsonl", limit=1000 if a.hellaswag is None else a.hellaswag)
    results: dict[str, dict] = {}
    if a.speed_only:  # the routes' budget from their prefill decisions on the ARC-Easy contexts
        from adaflex.retrofit.routes.apply import executed_mean

        e_routes = executed_mean(routed, [torch.tensor([encode_pair(tok, it.context, it.choices[0])[0]])
                                          for it in arc], tok.pad_token_id or 0)
        results = {"routes": {}}
    else:
        results["routes"] = {"arc_easy": mc_eval(routed, tok, arc, "routes arc")}
        e_routes = results["routes"]["arc_easy"]["executed_mean"]
    k = max(1, round(L - e_routes))
    log(f"routes executed {e_routes:.2f} on ARC-Easy: drop and random skip {k} / {L - e_routes:.2f} blocks")

    # ---- baselines at the same budget ----
    dropped = copy.deepcopy(model)
    bi = block_influence(model, ctx.calibration[:8])
    removed = choose(bi, k, [])
    remove_blocks(dropped, [i for i in range(L) if i not in removed])
    rand = copy.deepcopy(model)
    install(rand, RandomPolicy(L, L - e_routes, seed=recipe.seed))
    systems = {"dense": model, "drop": dropped, "random": rand, "routes": routed}
    for name in ("dense", "drop", "random") if not a.speed_only else ():
        results[name] = {"arc_easy": mc_eval(systems[name], tok, arc, f"{name} arc")}
        log(f"{name} arc {results[name]['arc_easy']}")
    for name in systems if not a.speed_only else ():
        results[name]["hellaswag"] = mc_eval(systems[name], tok, hs, f"{name} hellaswag")
        log(f"{name} hellaswag {results[name]['hellaswag']}")

    # ---- speed, side by side ----
    prompts = [torch.tensor([encode_pair(tok, it.context, it.choices[0])[0]]) for it in arc[: a.speed_prompts]]
    sp = speed(systems, prompts, a.decode, a.repeats)
    for name in systems:
        ip, idec = ideal(model, sp[name]["executed"], prompts)
        sp[name].update(prefill_speedup=sp[name]["prefill_tok_s"] / sp["dense"]["prefill_tok_s"],
                        decode_speedup=sp[name]["decode_tok_s"] / sp["dense"]["decode_tok_s"],
                        ideal_prefill=ip, ideal_decode=idec)
        sp[name]["prefill_of_ideal"] = (sp[name]["prefill_speedup"] - 1) / (ip - 1) if ip > 1 else None
        sp[name]["decode_of_ideal"] = (sp[name]["decode_speedup"] - 1) / (idec - 1) if idec > 1 else None
        results.setdefault(name, {})["speed"] = sp[name]
    total = time.perf_counter() - t_start
    report = {"command": " ".join(sys.argv), "recipe": recipe.to_dict(), "fit_seconds": fit_s,
              "total_seconds": total, "fit": fitted.metrics, "drop_removed": removed, "results": results}
    name = "speed.json" if a.speed_only else "report.json"
    (out / name).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if a.speed_only:
        for name, r in results.items():
            s = r["speed"]
            print(f"| {name} | {sum(s['executed']) / len(s['executed']):.2f} | {s['prefill_tok_s']:.1f} | "
                  f"{s['decode_tok_s']:.1f} | {s['prefill_speedup']:.3f} ({s['ideal_prefill']:.3f}) | "
                  f"{s['decode_speedup']:.3f} ({s['ideal_decode']:.3f}) |")
        return
    print(table(results, fitted.metrics, total))


def seed_spread(a, model, tok, out: Path, sets: list[str]) -> None:
    """Routes accuracy across router seeds: labels, dial prompts and evaluation items fixed, only the routers'
    initialisation and batch order change (how much of a routes-vs-dense gap is one seed's luck)."""
    impl = registry.get("routes")
    arc = read_mc(ROOT.parent / "shared/data/arc_easy_validation.jsonl", limit=a.arc)
    hs = read_mc(ROOT.parent / "shared/data/hellaswag_dev.jsonl", limit=a.hellaswag) if a.hellaswag else []
    rows = []
    for seed in [int(s) for s in a.router_seeds.split(",")]:
        r_recipe = load_recipe(a.recipe, [*sets, f"routes.router_seed={seed}"])
        (_method, cfg), = r_recipe.stage_items()
        fitted = impl.fit(StageContext(model, tok, r_recipe, 0, out / "state"), cfg)
        routed = copy.deepcopy(model)
        impl.apply(routed, impl.read_plan(fitted.plan, "routes"), fitted.tensors)
        row = {"seed": seed, "dial": fitted.metrics["dial"], "arc_easy": mc_eval(routed, tok, arc, f"seed {seed} arc")}
        if hs:
            row["hellaswag"] = mc_eval(routed, tok, hs, f"seed {seed} hellaswag")
        rows.append(row)
        log(f"router seed {seed}: {json.dumps(row)}")
        del routed
    (out / "seeds.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    head = "| router seed | dial | ARC-E blocks | ARC-E acc | ARC-E acc_norm |" + (
        " HS blocks | HS acc | HS acc_norm |" if hs else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        e = r["arc_easy"]
        line = f"| {r['seed']} | {r['dial']:.3f} | {e['executed_mean']:.2f} | {e['acc']:.3f} | {e['acc_norm']:.3f} |"
        if hs:
            h = r["hellaswag"]
            line += f" {h['executed_mean']:.2f} | {h['acc']:.3f} | {h['acc_norm']:.3f} |"
        lines.append(line)
    accs = [r["arc_easy"]["acc"] for r in rows]
    lines.append(f"\nARC-Easy acc over {len(rows)} router seeds: mean {sum(accs) / len(accs):.4f}, "
                 f"min {min(accs):.3f}, max {max(accs):.3f}")
    print("\n".join(lines))


def table(results, fit, total):
    lines = [("| system | blocks run (ARC-E / HS) | ARC-E acc | ARC-E acc_norm | HS acc | HS acc_norm | prefill tok/s "
             "| decode tok/s | prefill × (ideal) | decode × (ideal) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["speed"]
        lines.append(f"| {name} | {r['arc_easy']['executed_mean']:.2f} / {r['hellaswag']['executed_mean']:.2f} | "
                     f"{r['arc_easy']['acc']:.3f} | "
                     f"{r['arc_easy']['acc_norm']:.3f} | {r['hellaswag']['acc']:.3f} | "
                     f"{r['hellaswag']['acc_norm']:.3f} | "
                     f"{s['prefill_tok_s']:.1f} | {s['decode_tok_s']:.1f} | {s['prefill_speedup']:.2f} "
                     f"({s['ideal_prefill']:.2f}) | {s['decode_speedup']:.2f} ({s['ideal_decode']:.2f}) |")
    lines.append(f"\nMCTS: {fit.get('examples')} examples, {fit.get('labelled')} labelled, "
                 f"{fit.get('fixes')} fixes, "
                 f"kept {fit.get('kept')}; block evaluations {fit.get('block_evals')} vs "
                 f"{fit.get('block_evals_naive')} "
                 f"naive ({fit.get('prefix_reuse_saving', 0):.0%} saved); dial {fit.get('dial')}; total {total:.0f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
