"""How far can a per-question choice of skipped blocks go on SmolLM2? (a script, not collected by pytest)

    OMP_NUM_THREADS=2 python tests/bench/routes_choosers.py [--train 400 --blocks 12-17 --skip 4 --out runs/choosers]

Scores ARC-Easy train questions (--train, a seeded sample) and all ARC-Easy validation questions under dense and
every set of --skip blocks among --blocks skipped (prefix reuse: blocks before a path's first change run once per
question), with each prompt's states entering the first candidate block (token mean and last token). Then, trained
on the train questions only and applied to validation: choosers that pick one set per question from those states
(ridge regression, or the mean over the k nearest train questions), targets the per-set lead of the correct choice
over dense's, correctness, or agreement with dense's answer; feature set, target and chooser chosen by 5-fold
cross-validation on train. Prints dense, every static set, the best static set on train, the chosen chooser, and
the oracle (any set right) on validation;
with --val 0 only the sets' train accuracy (e.g. --skip 1 --blocks 1-28 ranks single blocks for a candidate list).
--move repeat runs each candidate set's blocks twice instead of skipping them; --repeat B,... adds blocks that every
non-dense path runs twice, --drop B,... blocks that every non-dense path skips (e.g. --skip 5 --repeat 27: five
skipped, one repeated, 26 executed).
Scores are cached per split in --out and resume after an interruption.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
from pathlib import Path

import torch

from adaflex.retrofit import restore
from adaflex.retrofit.data import read_mc
from adaflex.retrofit.recipe import load_recipe
from adaflex.retrofit.routes.choosers import (
    acc,
    block_args,
    chosen_acc,
    cv_acc,
    features,
    fit,
    path_of,
    tables,
    target,
)
from adaflex.retrofit.routes.label import BlockRunner, PathScorer, to_examples

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared/data"
FEATURES = ("mean", "last", "mean+last")
TARGETS = ("lead", "correct", "agree")
CHOOSERS = [("ridge", a) for a in (1.0, 10.0, 100.0, 1000.0, 10000.0)] + [("knn", k) for k in (5, 15, 45, 135)]


def log(msg):
    print(f"[choosers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def score_split(model, tok, cfg, items, paths: list[tuple], first: int, cache: Path) -> dict:
    """Per question: choice log-likelihoods under each of `paths` (executed blocks in order, dense first), and
    the prompt's mean and last-token states entering block `first`. Saved to `cache` every 25 questions
    (resumes)."""
    rec = torch.load(cache) if cache.is_file() else {"paths": paths, "lp": [], "label": [], "mean": [], "last": []}
    if rec.get("paths") != paths:
        raise SystemExit(f"{cache}: scored for other paths; choose another --out")
    exs = to_examples(cfg, tok, [("mc", it) for it in items])
    rec = {k: v[: len(exs)] if k != "paths" else v for k, v in rec.items()}  # a smaller --train: its prefix
    runner = BlockRunner(model)
    t0 = time.perf_counter()
    for i, ex in enumerate(exs[len(rec["lp"]):], start=len(rec["lp"])):
        scorer = PathScorer(runner, ex, cfg)
        h = scorer.hidden(tuple(range(first)))
        P = ex.prompt.shape[1]  # the prefill: the context without its last token
        rec["mean"].append(h[0, :P].float().mean(0))
        rec["last"].append(h[0, P - 1].float())
        rec["lp"].append([runner.logprobs(scorer.hidden(path), scorer.targets) for path in paths])
        rec["label"].append(ex.label)
        if (i + 1) % 25 == 0 or i + 1 == len(exs):
            torch.save(rec, cache.with_suffix(".tmp"))
            os.replace(cache.with_suffix(".tmp"), cache)  # an interruption leaves the previous cache whole
            log(f"{cache.name}: {i + 1}/{len(exs)} ({time.perf_counter() - t0:.0f} s)")
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=400, help="ARC-Easy train questions (seeded sample)")
    ap.add_argument("--val", type=int, default=None, help="ARC-Easy validation questions (default all 570)")
    ap.add_argument("--blocks", default="12-17", help="candidate blocks: lo-hi or a comma list")
    ap.add_argument("--skip", type=int, default=4, help="blocks in every candidate set")
    ap.add_argument("--move", choices=("skip", "repeat"), default="skip",
                    help="what a candidate set does to its blocks: skip them or run each twice")
    ap.add_argument("--repeat", default="", help="comma list of blocks every non-dense path also runs twice")
    ap.add_argument("--drop", default="", help="comma list of blocks every non-dense path also skips")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/choosers")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        cand, repeat, drop = block_args(a.blocks, a.repeat, a.drop)
    except ValueError as e:
        ap.error(str(e))
    sets = [()] + list(itertools.combinations(cand, a.skip))
    if len(sets) < 2 or a.skip < 1:
        ap.error(f"--skip {a.skip} with --blocks {a.blocks}: no skip set (need 1 <= skip <= {len(cand)})")
    lo = cand[0]
    recipe = load_recipe(ROOT / "recipes/bench/smollm2-routes.yaml", [])
    (_method, cfg), = recipe.stage_items()
    model, tok = restore.load(recipe.model)
    model.eval()
    L = len(model.get_decoder().layers)
    if min(cand + list(repeat + drop)) < 0 or max(cand + list(repeat + drop)) >= L:
        ap.error(f"--blocks {a.blocks} / --repeat {a.repeat} / --drop {a.drop}: the model has blocks 0-{L - 1}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train_items = read_mc(DATA / "arc_easy_train.jsonl")
    random.Random(123).shuffle(train_items)
    val_items = read_mc(DATA / "arc_easy_validation.jsonl", limit=a.val)
    tag = f"{a.blocks.replace(',', '_')}-k{a.skip}" + ("-repeat" if a.move == "repeat" else "") + \
        (f"-r{'_'.join(map(str, repeat))}" if repeat else "") + (f"-d{'_'.join(map(str, drop))}" if drop else "")
    paths = [path_of(L, s, a.move, repeat, drop) for s in sets]
    tr = score_split(model, tok, cfg, train_items[: a.train], paths, lo, out / f"train-{tag}.pt")
    lt, pt = tables(tr)
    rep = (f" + skip {','.join(map(str, drop))}" if drop else "") + \
        (f" + repeat {','.join(map(str, repeat))}" if repeat else "")

    def name(s: int) -> str:
        return f"{a.move} {','.join(map(str, sets[s]))}{rep}" if s else "dense"
    if not val_items:  # --val 0: a scan of the sets on train questions only (e.g. --skip 1 to rank blocks)
        print("| path | train acc | train: mean lead change against dense |\n|---|---|---|")
        for s in sorted(range(len(sets)), key=lambda s: -acc(lt, s)):
            print(f"| {name(s)} | {acc(lt, s):.3f} | "
                  f"{(lt[:, s] - lt[:, 0]).mean():+.3f} |")
        return
    va = score_split(model, tok, cfg, val_items, paths, lo, out / f"val-{tag}.pt")
    lv, pv = tables(va)
    print(f"ARC-Easy: {len(lt)} train questions, {len(lv)} validation; {len(sets) - 1} sets of {a.skip} "
          f"{a.move}{'ped' if a.move == 'skip' else 'ed'} blocks among {a.blocks}{rep}\n")
    print("| path | train acc | val acc | val: same answer as dense |\n|---|---|---|---|")
    print(f"| dense | {acc(lt, 0):.3f} | {acc(lv, 0):.3f} | 1.000 |")
    for s in range(1, len(sets)):
        print(f"| {name(s)} | {acc(lt, s):.3f} | {acc(lv, s):.3f} | "
              f"{(pv[:, s] == pv[:, 0]).float().mean():.3f} |")
    best = 1 + max(range(len(sets) - 1), key=lambda s: acc(lt, s + 1))
    Xt, Xv = {f: features(tr, f) for f in FEATURES}, {f: features(va, f) for f in FEATURES}
    Yt = {t: target(t, lt, pt) for t in TARGETS}
    cv = {(f, t, ch): cv_acc(Xt[f], Yt[t], lt, ch) for f in FEATURES for t in TARGETS for ch in CHOOSERS}
    pred = {key: fit(Xt[key[0]], Yt[key[1]], key[2])(Xv[key[0]]) for key in cv}  # trained on all of train
    f, t, ch = picked = max(cv, key=cv.get)
    used = len(set((1 + pred[picked].argmax(1)).tolist()))
    oracle = (lv[:, 1:] > 0).any(1).float().mean().item()
    print(f"\nbest static set on train: {name(best)} -> val {acc(lv, best):.3f}")
    print(f"chooser picked by 5-fold CV on train: features {f}, target {t}, {ch[0]} {ch[1]:g} "
          f"(CV acc {cv[picked]:.3f}) -> val {chosen_acc(pred[picked], lv):.3f} ({used} sets used)")
    print(f"oracle (a set that answers right, when there is one) -> val {oracle:.3f}; dense {acc(lv, 0):.3f}")
    print("\nevery chooser, val acc (for reference; only the CV column chose):")
    print("| features | target | chooser | CV acc (train) | val acc |\n|---|---|---|---|---|")
    for (f, t, ch), c in cv.items():
        print(f"| {f} | {t} | {ch[0]} {ch[1]:g} | {c:.3f} | {chosen_acc(pred[f, t, ch], lv):.3f} |")


if __name__ == "__main__":
    main()
