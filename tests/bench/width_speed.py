"""Width's CPU speed-up against the ideal its MACs predict, by model scale (a script, not collected by pytest).

Why: on SmolLM2-135M width's measured speed-up stays below the MACs' ideal while drop's exceeds it (width
README, speed runs). Width shrinks the matrix products only; what the MACs do not count (each block's norms,
rotary, attention scores, activation, residual adds and the per-module dispatch of a small model) stays, where
drop removes all of it. If that is the cause, the gap closes as the linears grow. This script times, on random
weights (speed does not depend on the values), Llama-shaped models of growing width: dense, `drop` of the same
share of blocks, and uniform FFN-only width removing that share of the block MACs, with tests/bench/width.py's
timing (alternating with dense, best of --repeats).

    OMP_NUM_THREADS=2 python tests/bench/width_speed.py --out runs/bench-width-speed-scale.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # a bench script: width.py's timing, not a test import
from synthetic import build, drop_blocks, narrow_uniform  # noqa: E402
from width import speed  # noqa: E402

from adaflex.retrofit.arch import decoder_layers  # noqa: E402
from adaflex.retrofit.evaluate import cost_figures  # noqa: E402

# (name, hidden, intermediate, heads, kv heads, layers): SmolLM2-135M's block shape, then wider blocks
SHAPES = [("smollm2-135m shape", 576, 1536, 9, 3, 30), ("1B-like", 2048, 8192, 32, 8, 8),
          ("7B-like", 4096, 11008, 32, 32, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fraction", type=float, default=0.25, help="share of blocks (drop) / block MACs (width)")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench-width-speed-scale.json")
    args = ap.parse_args()
    rows = []
    for name, *shape in SHAPES:
        dense = build(*shape)
        L = len(decoder_layers(dense))
        ids = torch.randint(0, 49152, (1, max(args.prefill, args.context)))
        k = max(1, round(args.fraction * L))
        calib = torch.randint(0, 49152, (2, 64))
        for method in ("drop", "uniform-mlp"):
            model = copy.deepcopy(dense)
            if method == "drop":
                drop_blocks(model, k)
            else:
                narrow_uniform(model, k / L, calib)
            flops = cost_figures(model, ids[:, :64])["flops_ratio"]
            sp = speed(model, dense, ids, args.prefill, args.context, args.decode_steps, args.repeats)
            row = {"shape": name, "method": method, "flops_ratio": flops, "ideal": 1 / flops, **sp,
                   "prefill_of_ideal": sp["prefill_x"] * flops, "decode_of_ideal": sp["decode_x"] * flops}
            rows.append(row)
            print(f"| {name} | {method} | {flops:.4f} | {1 / flops:.3f} | {sp['prefill_x']:.3f} | "
                  f"{row['prefill_of_ideal']:.2f} | {sp['decode_x']:.3f} | {row['decode_of_ideal']:.2f} |", flush=True)
            del model
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    assert all(math.isfinite(r["prefill_x"]) for r in rows)


if __name__ == "__main__":
    main()
