"""Benchmark of the `shards` stage on SmolLM2-135M (a script, not collected by pytest).

SmolLM2-135M with the 3 blocks of least influence dropped (ShortGPT), healed by KL distillation from
the dense model on WikiText-2 dev articles, scored on other (held-out) articles: no adapter, LoRA r=8,
MoS r=8 e=1 (1/8 of LoRA's parameters), each adapter on every seed. Settings come from
recipes/bench/smollm2-shards.yaml (sized for 16-17.5 minutes on 2 idle cores); flags override them.

    OMP_NUM_THREADS=2 python tests/bench/shards.py --seeds 0 1 --out runs/bench-shards.json

Teacher logits of the training windows are computed once by the dense model (kept in bfloat16, read by
the chunked KL without a whole fp32 copy) and shared by every run, so a training step costs one student
forward and backward.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adaflex.retrofit.arch import decoder_layers
from adaflex.retrofit.drop.apply import block_influence, choose, remove_blocks
from adaflex.retrofit.evaluate import perplexity
from adaflex.retrofit.recipe import load_recipe
from adaflex.retrofit.restore import load
from adaflex.retrofit.shards.apply import collect, init_tensors, install, make_plan, write_peft_lora
from adaflex.retrofit.shards.layer import remove_all
from adaflex.retrofit.shards.train import heal

ROOT = Path(__file__).resolve().parents[2]
HEADING = re.compile(r"^ = [^=].* = $")


def articles(text: str) -> list[str]:
    """Split WikiText at its top-level ` = Title = ` headings."""
    out, cur = [], []
    for line in text.splitlines():
        if HEADING.match(line) and cur:
            out.append("\n".join(cur))
            cur = []
        cur.append(line)
    if cur:
        out.append("\n".join(cur))
    return out


def token_windows(tok, text: str, n: int, seq_len: int) -> torch.Tensor:
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    k = min(n, ids.numel() // seq_len)
    return ids[: k * seq_len].view(k, seq_len)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/bench/smollm2-shards.yaml"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/wikitext2_dev.txt"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, help="override the recipe's steps")
    ap.add_argument("--lr", type=float, help="override the recipe's lr (the MoS runs')")
    # each adapter at its own tuned lr: shared pools take a larger one (20-step runs, seed 0: MoS best at
    # 1e-2 of {5e-3, 1e-2, 2e-2}, LoRA at 2e-3 of {1e-3, 2e-3, 5e-3}; README of retrofit/shards)
    ap.add_argument("--lora-lr", type=float, default=0.002, help="lr of the LoRA runs")
    ap.add_argument("--train-windows", type=int, help="default: the recipe's calibration samples")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, help="override the recipe's batch_size")
    ap.add_argument("--seq-len", type=int, help="override the recipe's training seq_len")
    ap.add_argument("--warmup", type=int, help="override the recipe's warmup")
    ap.add_argument("--methods", nargs="+", default=["lora", "mos"])
    ap.add_argument("--cache", default=str(ROOT / "runs" / "bench-shards-cache.pt"),
                    help="dense perplexity, teacher logits and block influence are kept here between runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    recipe = load_recipe(args.recipe)
    (_, drop_cfg), (_, shards_cfg) = recipe.stage_items()
    over = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("batch_size", args.batch_size),
                              ("seq_len", args.seq_len), ("warmup", args.warmup)) if v is not None}
    shards_cfg = shards_cfg.model_copy(update=over)
    seq_len = shards_cfg.seq_len or recipe.data.calibration.seq_len
    n_train = args.train_windows or recipe.data.calibration.samples

    model, tok = load(recipe.model)
    model.eval()
    arts = articles(Path(args.data).read_text())
    train_text = "\n".join(a for i, a in enumerate(arts) if i % 3 != 2)
    eval_text = "\n".join(a for i, a in enumerate(arts) if i % 3 == 2)
    train = token_windows(tok, train_text, n_train, seq_len)
    log(f"{len(arts)} articles: {len(arts) - len(arts) // 3} train, {len(arts) // 3} held out; "
        f"{train.shape[0]} training windows of {seq_len}")

    def ppl() -> float:
        return perplexity(model, tok, eval_text, seq_len=args.eval_seq_len, limit=args.eval_windows,
                          batch_size=4, label="held-out").value

    key = [recipe.model, train.tolist(), args.eval_windows, args.eval_seq_len]
    cache = Path(args.cache)
    dense = torch.load(cache, weights_only=True) if cache.is_file() else None
    if dense is None or dense["key"] != key:
        with torch.no_grad():  # the dense teacher's logits, once
            t0 = time.time()
            logits = torch.cat([model(input_ids=train[s : s + 4], use_cache=False).logits.to(torch.bfloat16)
                                for s in range(0, train.shape[0], 4)])
            log(f"teacher logits {tuple(logits.shape)} in {time.time() - t0:.0f}s")
            dense = {"key": key, "ppl": ppl(), "teacher_logits": logits,
                     "bi": block_influence(model, train[: min(8, train.shape[0])])}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dense, cache)
    teacher_logits, bi = dense["teacher_logits"], dense["bi"]
    rows = [{"model": "dense (30 blocks)", "ppl": dense["ppl"]}]
    log(f"dense held-out ppl {rows[0]['ppl']:.2f}")
    k = drop_cfg.count(len(decoder_layers(model)))
    removed = choose(bi, k, drop_cfg.protect)
    n = len(decoder_layers(model))
    remove_blocks(model, [i for i in range(n) if i not in removed])
    base = {"model": f"dropped {removed} (no adapter)", "ppl": ppl(), "trainable_params": 0}
    rows.append(base)
    log(f"dropped {removed}: held-out ppl {base['ppl']:.2f}")

    def teacher(which, _ids):
        return teacher_logits[which]  # bfloat16: the KL reads it chunk by chunk in fp32

    tmp = Path(tempfile.mkdtemp(prefix="adaflex-bench-"))
    for method in args.methods:
        for seed in args.seeds:
            lr = args.lora_lr if method == "lora" else shards_cfg.lr
            cfg = shards_cfg.model_copy(update={"method": method, "lr": lr})
            plan = make_plan(model, cfg)
            install(model, plan, init_tensors(plan, seed))
            t0, c0 = time.time(), time.process_time()
            m = heal(model, train, cfg, teacher, seed=seed)
            train_s, train_cpu_s = time.time() - t0, time.process_time() - c0
            tensors = collect(model, plan)
            f = tmp / f"{method}-{seed}.safetensors"
            save_file(tensors, str(f))
            write_peft_lora(model, plan, tmp / f"{method}-{seed}-peft")
            model.eval()
            row = {"model": f"{method} r={cfg.rank}" + (f" e={cfg.equivalent_rank} l={cfg.shards_per_vector}"
                                                        if method == "mos" else "") + f" lr={lr:g}",
                   "seed": seed, "ppl": ppl(), "trainable_params": plan.trainable_params,
                   "adapter_bytes": f.stat().st_size,
                   "peft_lora_bytes": (tmp / f"{method}-{seed}-peft" / "adapter_model.safetensors").stat().st_size,
                   "train_tokens": m["train_tokens"], "train_tokens_per_s": m["train_tokens_per_s"],
                   "train_s": train_s, "train_cpu_s": train_cpu_s,
                   "kl_first": m["train_loss_first"], "kl_last": m["train_loss_last"]}
            rows.append(row)
            log(json.dumps(row))
            remove_all(model)

    lora = {r["seed"]: r for r in rows if r["model"].startswith("lora")}
    mos = {r["seed"]: r for r in rows if r["model"].startswith("mos")}
    verdict = []
    for s in sorted(set(lora) & set(mos)):
        ratio = mos[s]["ppl"] / lora[s]["ppl"]
        params = mos[s]["trainable_params"] / lora[s]["trainable_params"]
        verdict.append({"seed": s, "ppl_ratio": ratio, "param_ratio": params,
                        "pass": ratio <= 1.02 and params <= 1 / 8 + 1e-12})
    out = {"settings": {**shards_cfg.model_dump(mode="json"), "lora_lr": args.lora_lr,
                        "train_windows": train.shape[0], "seq_len": seq_len,
                        "eval_windows": args.eval_windows, "eval_seq_len": args.eval_seq_len, "seeds": args.seeds,
                        "removed": removed, "threads": args.threads},
           "rows": rows, "verdict": verdict, "wall_s": time.time() - t_start}
    print(table(rows))
    for v in verdict:
        print(f"seed {v['seed']}: MoS/LoRA ppl {v['ppl_ratio']:.4f}, params {v['param_ratio']:.4f} -> "
              f"{'PASS' if v['pass'] else 'MISS'}")
    print(f"wall {out['wall_s']:.0f}s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def table(rows: list[dict]) -> str:
    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    head = ("| model | seed | held-out ppl | trainable params | adapter file bytes | as peft LoRA bytes | "
            "train tok/s | KL first → last |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl_first']:.3f} → {r['kl_last']:.3f}" if r.get("kl_first") is not None else ""
        lines.append(f"| {r['model']} | {r.get('seed', '')} | {r['ppl']:.2f} | {fmt(r.get('trainable_params'), ',')} | "
                     f"{fmt(r.get('adapter_bytes'), ',')} | {fmt(r.get('peft_lora_bytes'), ',')} | "
                     f"{fmt(r.get('train_tokens_per_s'), '.0f')} | {kl} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
