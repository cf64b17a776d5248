"""What eviction can reach on the continuation-perplexity protocol (a script, not collected by pytest).

    nice python tests/bench/kv_bounds.py [--windows 4] [--context 1024] [--continuation 128] [--budget 0.25]
        [--layers] [--heads 17,18,20,23] [--threads 2]

Per WikiText-2 dev window: the full cache; the context truncated to its last budget x C tokens (what
StreamingLLM keeps, sinks aside); and uniform per-layer selections through the budgeted cache ranked by
(a) SnapKV's window attention, (b) the attention every prompt query gave (h2o) and (c) an oracle: the
attention the continuation's own queries give each context key (known only after the fact). The oracle
bounds what any prompt-only scorer can reach at this budget. `--layers`: also, for each layer, the mix policy at a
uniform budget everywhere but that layer, which keeps its whole cache: which layers' eviction costs the most
(what the `searched` allocation's layer gains measure on calibration text). `--heads L,...`: the same with only one
KV head of layer L at full cache (a per-head plan; what the head gains measure).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "wikitext2_dev.txt"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--layers", action="store_true", help="also: one layer at full cache, the others at the budget")
    ap.add_argument("--heads", default="", help="also: one KV head of each of these layers at full cache")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from adaflex.retrofit import restore
    from adaflex.retrofit.kv.apply import continuation_nll, head_gains, install, layer_gains, spec_from
    from adaflex.retrofit.kv.attention import profile
    from adaflex.retrofit.kv.config import KVConfig
    from adaflex.retrofit.kv.policies import Policy, group_mean
    from adaflex.retrofit.kv.replay import record_prefill, replay

    @dataclass
    class Given(Policy):  # scores computed outside, one [B, Hkv, K] per layer, in layer order
        name: str = "given"
        per_layer: list = field(default_factory=list)
        calls: int = 0

        def score(self, probs, groups, length, mass=None):
            self.calls += 1
            return self.per_layer[self.calls - 1]

    model, tok = restore.load(a.model)
    n, h = model.config.num_hidden_layers, model.config.num_key_value_heads
    heads = [int(i) for i in filter(None, a.heads.split(","))]
    mix = dict(policy="mix", stat="rms", kernel=15)
    ids = tok(DATA.read_text(), add_special_tokens=False).input_ids
    C, N = a.context, a.continuation
    span = C + N
    install(model, spec_from(KVConfig(budget=1.0), n, model=model))
    nll: dict[str, float] = {}

    def put(name, total):  # summed NLL of a row over the windows
        nll[name] = nll.get(name, 0.0) + total

    def add(name, logits, tgt):
        put(name, float(F.cross_entropy(logits.float(), tgt, reduction="sum")))

    for w in range(a.windows):
        x = torch.tensor([ids[w * span:(w + 1) * span]])
        tgt = x[0, C:]
        oracle = [None] * n

        # what the continuation's queries attend to (SmolLM2: no window, no softcap)
        def watch(i, q, k, valid, scaling, g, oracle=oracle, **_):
            logits = torch.matmul(q[:, :, C:].float(), k.float().repeat_interleave(g, 1).transpose(2, 3)) * scaling
            future = torch.arange(span)[None, :] > torch.arange(C, span)[:, None]
            probs = torch.softmax(logits.masked_fill(future, float("-inf")), -1)
            oracle[i] = group_mean(probs[..., :C].mean(2), g)

        with torch.no_grad(), profile(watch):
            full = model(input_ids=x, cache=model.adaflex.make_cache(), use_cache=True, logits_to_keep=N + 1)
        add("full cache", full.logits[0, :-1], tgt)
        keep = int(a.budget * C)
        with torch.no_grad():
            trunc = model(input_ids=x[:, C - keep:], logits_to_keep=N + 1).logits[0, :-1]
        add(f"last {keep} context tokens only", trunc, tgt)
        rec = record_prefill(model, x[:, :C], window=32)
        for name, policy, kernel in (("snapkv (k7)", "snapkv", 7), ("snapkv (k15)", "snapkv", 15), ("h2o", "h2o", 7),
                                     ("mix (k15)", "mix", 15), ("oracle", None, 1)):
            spec = spec_from(KVConfig(budget=a.budget, policy=policy or "snapkv", kernel=kernel), n, model=model)
            if policy is None:
                spec.policy = Given(per_layer=oracle)
            cache = replay(spec, rec)
            with torch.no_grad():
                out = model(input_ids=x[:, C:], cache=cache, use_cache=True)
            add(name, torch.cat([rec.logits, out.logits[0, :-1].float()]), tgt)
        # the searched allocation's gains on this window: NLL with one layer (head) at full cache, the rest at the
        # budget; each plan is evaluated once (the uniform baseline serves both kinds of gain and its own row)
        seen: dict = {}

        def objective(fractions, budget=None, rec=rec, x=x, seen=seen):
            f = np.asarray(fractions, dtype=np.float64)
            key = (budget, f.shape, f.tobytes())
            if key not in seen:
                spec = spec_from(KVConfig(budget=budget or a.budget, **mix), n, f, model)
                total, count = continuation_nll(model, replay(spec, rec), rec, x[:, C:])
                seen[key] = total / count
            return seen[key]

        base = objective(np.full(n, a.budget))
        if a.layers:
            for i, g in enumerate(layer_gains(objective, a.budget, n)):
                put(f"mix, layer {i} at full cache", (base - g) * N)
        if heads:
            gains = head_gains(objective, a.budget, n, h, heads)
            for i, j in [(i, j) for i in heads for j in range(h)]:
                put(f"mix, layer {i} head {j} at full cache", (base - gains[i, j]) * N)
        put("mix (rms, k15)", base * N)
    count = a.windows * N
    print(f"| selection ({a.budget:.0%} of {C} tokens, uniform) | perplexity | × full |")
    print("|---|---|---|")
    for k, v in nll.items():
        print(f"| {k} | {math.exp(v / count):.2f} | {math.exp((v - nll['full cache']) / count):.3f} |")


if __name__ == "__main__":
    main()
