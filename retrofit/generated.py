"""`generated` data: text the dense model writes itself, so calibration, healing and a fidelity check need no
dataset (self-calibration; LLM-QAT's data-free distillation samples the model the same way).

N sequences of L tokens are sampled (temperature, top-k; seeded) from a few fixed seed prompts, batched through the
KV cache, on the dense model before any stage changes it. The held-out split (`generated:test`) starts from other
prompts with another seed, so an evaluation never scores text the calibration saw. The result is cached under the
adaflex cache dir (ADAFLEX_CACHE) per model fingerprint, split and settings, written atomically: a second run, or a
resume, reads it back instead of sampling again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import Field

from . import io
from .errors import UsageError
from .progress import bar
from .schema import BATCH, SEED, TOKENS, WINDOWS, Strict, capped

VERSION = 1  # bump when the sampling changes: older cached text is then ignored

# Plain-prose openings (no chat template): a general model continues each as ordinary text. Two sets, so the
# held-out text never shares an opening with the calibration text.
PROMPTS = {
    "train": ("The", "In the early years of the", "A new study published", "The history of", "Once upon a time,",
              "Here is how to", "The city is known for", "According to the report,"),
    "test": ("It was", "Scientists have found that", "The first time I", "During the war,", "The museum",
             "In mathematics,", "The company announced", "Most people think"),
}
TEST_SEED_OFFSET = 1_000_003


class GeneratedConfig(Strict):
    """Settings of `generated` text (recipe key `data.generated`)."""

    sequences: int = capped(32, WINDOWS, ge=1, description="sequences of the calibration split (`generated`)")
    test_sequences: int = capped(8, WINDOWS, ge=1, description="sequences of the held-out split (`generated:test`)")
    tokens: int = capped(256, TOKENS, ge=8, description="tokens each sequence continues its prompt by")
    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature")
    top_k: int = capped(50, TOKENS, ge=0, description="sample among the k likeliest tokens (0: all)")
    batch_size: int = capped(16, BATCH, ge=1, description="sequences sampled together")
    seed: int | None = capped(None, SEED, ge=0, description="sampling seed (default: the recipe's)")


def fingerprint(model) -> str:
    """A cheap fingerprint of the weights and config: every tensor's shape, sum and a strided sample of its values
    (hashing all of a 135M model would cost a second per run)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1).float()
            sample = flat[:: max(1, flat.numel() // 1024)]
            h.update(f"{name}{tuple(p.shape)}{float(flat.sum()):.6e}".encode())
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def settings_of(cfg: GeneratedConfig, split: str, seed: int) -> dict:
    n = cfg.sequences if split == "train" else cfg.test_sequences
    s = (cfg.seed if cfg.seed is not None else seed) + (TEST_SEED_OFFSET if split == "test" else 0)
    return {"version": VERSION, "split": split, "sequences": n, "tokens": cfg.tokens, "temperature": cfg.temperature,
            "top_k": cfg.top_k, "seed": s, "prompts": list(PROMPTS[split])}


def cache_key(model_fp: str, settings: dict) -> str:
    return hashlib.sha256(json.dumps({"model": model_fp, **settings}, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(key: str) -> Path:
    from .models import cache_dir

    return cache_dir() / "generated" / f"{key}.safetensors"


def _check(model, cfg: GeneratedConfig, split: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.tokens + 16 > limit:
        raise UsageError(f"data.generated.tokens: {cfg.tokens} tokens after a prompt exceed the model's "
                         f"max_position_embeddings ({limit})")


@torch.no_grad()
def _sample(model, prompts: list[list[int]], tokens: int, temperature: float, top_k: int, gen, eos, pad: int, step):
    """One batch: prompts left-padded (masked; positions count real tokens only), then `tokens` sampled tokens."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    dev = model.device
    x = torch.full((len(prompts), width), pad, dtype=torch.long, device=dev)
    mask = torch.zeros_like(x)
    for r, p in enumerate(prompts):
        x[r, width - len(p):] = torch.tensor(p, device=dev)
        mask[r, width - len(p):] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)  # the dense model's plain cache
    out = model(input_ids=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
    last = pos[:, -1:]
    rows = []
    for _ in range(tokens):
        logits = out.logits[:, -1].float() / temperature
        if eos is not None:  # every sequence keeps writing: no short rows
            logits[:, eos] = float("-inf")
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        # drawn where the seeded generator is (the CPU), whatever the model's device
        nxt = torch.multinomial(torch.softmax(logits, -1).to(gen.device), 1, generator=gen)
        rows.append(nxt)
        nxt = nxt.to(dev)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        last = last + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=last, cache=out.cache, use_cache=True)
        step()
    new = torch.cat(rows, dim=1)
    return [torch.cat([torch.tensor(p, device=new.device), new[r]]) for r, p in enumerate(prompts)]


def sample(model, tokenizer, settings: dict, batch_size: int) -> tuple[list[torch.Tensor], list[int]]:
    """Sequences of `settings` (each its prompt and continuation) and their prompt lengths; prompts round-robin."""
    gen = torch.Generator().manual_seed(settings["seed"])
    prompts = [tokenizer(p, add_special_tokens=False).input_ids or [0] for p in settings["prompts"]]
    rows = [prompts[i % len(prompts)] for i in range(settings["sequences"])]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = []
    was_training = model.training
    model.eval()
    with bar(f"generating {settings['split']} text", settings["sequences"] * settings["tokens"]) as update:
        done = [0]
        for s in range(0, len(rows), batch_size):
            batch = rows[s : s + batch_size]

            def step(n=len(batch)):
                done[0] += n
                update(done[0])

            seqs += _sample(model, batch, settings["tokens"], settings["temperature"], settings["top_k"], gen, eos,
                            pad, step)
    model.train(was_training)
    return seqs, [len(p) for p in rows]


def generate(model, tokenizer, spec, cfg: GeneratedConfig, seed: int, log=None):
    """`generated` / `generated:test` for this dense model, from the cache, else sampled now: the sequences'
    token ids, where each continuation starts, the decoded text, and what inputs.json records."""
    split = spec.name
    _check(model, cfg, split)
    settings = settings_of(cfg, split, seed)
    key = cache_key(fingerprint(model), settings)
    path = cache_path(key)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            seqs = [f.get_tensor(f"seq.{i}") for i in range(int(meta["count"]))]
        starts = json.loads(meta["starts"])
    else:
        if log:  # minutes on a CPU, and the bar is silent without a terminal
            log(f"{spec.raw}: the dense model writes {settings['sequences']} sequences of {settings['tokens']} tokens "
                f"(cached as {path})")
        seqs, starts = sample(model, tokenizer, settings, cfg.batch_size)
        io.save_tensors(path, {f"seq.{i}": s for i, s in enumerate(seqs)},
                        {"count": str(len(seqs)), "starts": json.dumps(starts), "settings": json.dumps(settings)})
    text = "\n\n".join(tokenizer.decode(s.tolist(), skip_special_tokens=True) for s in seqs)
    return seqs, starts, text, {"generated": {k: v for k, v in settings.items() if k != "prompts"}, "cache_key": key}
