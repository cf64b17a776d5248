"""Emulate the `generated` data source (written before it landed; kept because retrofit/heal/README.md's first
quickstart figures cite it): the dense model samples its own text from generic seed prompts.
Seeded temperature sampling, batched generate; writes one text file (sequences separated by blank lines)."""
import argparse
import sys
import time

import torch

from adaflex.retrofit import load

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=96)
ap.add_argument("--tokens", type=int, default=256)
ap.add_argument("--batch", type=int, default=32)
ap.add_argument("--temperature", type=float, default=0.8)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
a = ap.parse_args()

SEEDS = [
    "The history of", "In science,", "Once upon a time,", "The main idea of this article is",
    "Question: Why do plants need sunlight?\nAnswer:", "Here is a short explanation of how",
    "Many people believe that", "The following is a lesson about", "In 1998,", "Scientists have found that",
    "A good way to learn", "The city is known for", "Question: What causes the seasons on Earth?\nAnswer:",
    "The study of animals", "When water is heated,", "Chapter 1.",
]
torch.manual_seed(a.seed)
t0 = time.time()
model, tok = load("smollm2-135m")
tok.padding_side = "left"
prompts = [SEEDS[i % len(SEEDS)] for i in range(a.n)]
texts = []
for s in range(0, a.n, a.batch):
    enc = tok(prompts[s:s + a.batch], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=a.temperature, top_p=0.95,
                             max_new_tokens=a.tokens, min_new_tokens=a.tokens, pad_token_id=tok.pad_token_id)
    texts += tok.batch_decode(out, skip_special_tokens=True)
    print(f"{len(texts)}/{a.n} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
open(a.out, "w").write("\n\n".join(t.strip() for t in texts) + "\n")
print(f"wrote {a.out}: {len(texts)} sequences, {time.time() - t0:.0f}s", file=sys.stderr)
