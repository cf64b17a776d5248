"""Probe of the `heal` stage on SmolLM2-135M (a script, not collected by pytest): drop the 6 blocks of least
influence, then heal at equal tokens (adapters only; LM head + last blocks) against no healing. Held-out
WikiText-2 dev articles (the last quarter of the file) score the models; calibration windows come only from
the other articles (written to a temporary file), so evaluation never sees training text.

    OMP_NUM_THREADS=2 python tests/bench/heal.py --out runs/heal-probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from shards import articles  # tests/bench/shards.py: the script's folder is on sys.path

import adaflex.retrofit as af
from adaflex.retrofit.evaluate import perplexity

HEAL = {"adapter": {"method": "lora", "rank": 16, "alpha": 16, "dropout": 0.0}, "tokens": 73728,
        "batch_size": 4, "seq_len": 256, "top_k": 64, "warmup": 4}
VARIANTS = {
    "drop 6 (unhealed)": None,
    "heal: LoRA r=16 (adapters)": {"train": ["adapters"], "lr": 2e-3},
    "heal: LM head + last 2 blocks": {"train": ["head", "last_blocks"], "last_blocks": 2, "weights_lr": 1e-4},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/wikitext2_dev.txt")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--limit", type=int, default=40, help="held-out windows of 512 tokens")
    ap.add_argument("--samples", type=int, default=288, help="calibration windows of 256 tokens (heal cycles "
                    "through them: 72 steps x 4 windows = 288 for one pass)")
    ap.add_argument("--only", nargs="*", help="variants to run (substrings of their names)")
    ap.add_argument("--out", default="runs/heal-probe.json")
    args = ap.parse_args()
    arts = articles(Path(args.data).read_text())
    cut = len(arts) * 3 // 4
    tmp = Path(tempfile.mkdtemp(prefix="heal-probe-"))
    (tmp / "calibration.txt").write_text("\n".join(arts[:cut]))
    held = "\n".join(arts[cut:])
    cal = {"path": str(tmp / "calibration.txt"), "samples": args.samples, "seq_len": 256}
    rows = []

    def record(name: str, model, tok, t0: float, report=None) -> None:
        ppl = perplexity(model, tok, held, 512, None, batch_size=4, limit=args.limit, label=name)
        row = {"variant": name, "perplexity": ppl.value, "n": ppl.n, "seconds": round(time.time() - t0),
               "flops_ratio": report.get("flops_ratio") if report else 1.0,
               "heal": report["stages"][-1] if report and len(report["stages"]) > 1 else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")

    t0 = time.time()
    if not args.only or "dense" in args.only:
        model, tok = af.load("smollm2-135m")
        record("dense", model, tok, t0)
    for name, heal in VARIANTS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        t0 = time.time()
        stages = [{"drop": {"blocks": args.blocks}}] + ([{"heal": {**HEAL, **heal}}] if heal else [])
        model, tok = af.load("smollm2-135m")
        report = af.run({"model": "smollm2-135m", "seed": 0, "data": {"calibration": cal}, "stages": stages},
                        model, tok, model_name="smollm2-135m", log=lambda m: print(f"  {m}", file=sys.stderr))
        record(name, model, tok, t0, report)


if __name__ == "__main__":
    main()
