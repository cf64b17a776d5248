"""Runtime overhead of a routed model against a statically cut one (a script, not collected by pytest).

    OMP_NUM_THREADS=2 python tests/bench/routes_overhead.py [--skip 12,13,14,15 --repeats 6]

SmolLM2-135M dense, the same blocks removed from the model (`drop`), and the routed runtime on a fixed path
skipping them: prefill and --decode steps on random prompts of 16-64 tokens, timed as routes.py does (systems
interleaved, best of --repeats per prompt); prints each system's speed-up over dense.
"""

from __future__ import annotations

import argparse
import copy

import torch
from routes import speed  # tests/bench/routes.py: the script's folder is on sys.path

from adaflex.retrofit import restore
from adaflex.retrofit.drop.apply import remove_blocks
from adaflex.retrofit.routes.runtime import FixedPolicy, install


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", default="12,13,14,15")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--decode", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = restore.load("smollm2-135m")
    model.eval()
    L = len(model.get_decoder().layers)
    skip = [int(b) for b in a.skip.split(",")]
    dropped = copy.deepcopy(model)
    remove_blocks(dropped, [b for b in range(L) if b not in skip])
    routed = copy.deepcopy(model)
    install(routed, FixedPolicy(counts=tuple(0 if b in skip else 1 for b in range(L))))
    systems = {"dense": model, "drop": dropped, "routes (fixed path)": routed}
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (1, n), generator=gen) for n in (16, 32, 48, 64)]
    res = speed(systems, prompts, a.decode, a.repeats)
    for phase in ("prefill", "decode"):
        for k in systems:
            r = res[k][f"{phase}_tok_s"]
            print(f"{phase} {k}: {r:.1f} tok/s ({r / res['dense'][f'{phase}_tok_s']:.3f}x dense)")


if __name__ == "__main__":
    main()
