"""MCTS labelling of training examples (search/mcts.py), with prefix hidden-state reuse, sharding, resume.

Rewards:
  * multiple choice: 0 unless the correct choice has the highest summed log-likelihood under the path
    (each choice is a row context + choice; the LM head runs only on the choice tokens); then 1
    (`mc_reward: correct`, Dr.LLM), or with `margin` (where dense is right) the path's lead of the
    correct choice over the best other one relative to dense's lead, capped at 1; correct when within
    `margin_tolerance` of dense;
  * text: dense NLL / path NLL of the scored second half of a window; a path is correct when its NLL is
    within `text_tolerance` of dense (success = 1 / (1 + tol)).
Block evaluations are counted: a path reuses the hidden states of its longest prefix already computed
for this example (a trie of states, at most `prefix_cache` kept), so blocks before the first changed
position are not recomputed; the naive count (every path from the embeddings) is reported beside it.
A multiple-choice example runs as one packed row, the context once and each choice after it at the
positions it would have, attending to the context and to itself only (a 4D mask): the same scores as one
row per choice, with the context's tokens computed once instead of once per choice.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from adaflex.search.mcts import enrich, search_path

from .. import arch, io
from ..arch import decoder_layers
from ..data import MC_LAYOUTS, calibration_windows
from ..errors import AdaflexError, UsageError
from ..evaluate.mc import encode_pair
from ..progress import progress


@dataclass
class Example:
    index: int
    kind: str  # "mc" or "text"
    rows: torch.Tensor  # [R, T] token ids, right-padded
    prompt: torch.Tensor  # [1, P] prompt tokens the routers read at prefill
    targets: list  # per row: (positions LongTensor, token ids LongTensor)
    label: int = 0  # mc: index of the correct choice
    packed: tuple | None = None  # mc: (ids [1, N], position ids [1, N], segment [N], targets in the packed row)


def _pack(ctx: list[int], choices: list[list[int]]) -> tuple:
    """Context then every choice in one row; choice r's token j sits at position len(ctx) + j, and its
    targets are predicted from the last context token and then from its own tokens."""
    Tc = len(ctx)
    ids, pos, seg, targets, start = list(ctx), list(range(Tc)), [0] * Tc, [], Tc
    for r, c in enumerate(choices):
        ids += c
        pos += range(Tc, Tc + len(c))
        seg += [r + 1] * len(c)
        targets.append((torch.tensor([Tc - 1] + list(range(start, start + len(c) - 1))), torch.tensor(c)))
        start += len(c)
    return torch.tensor([ids]), torch.tensor([pos]), torch.tensor(seg), targets


def packed_mask(seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [1, 1, N, N] (eager and sdpa attention read it as is): causal, and a choice's token
    sees the context (segment 0) and its own segment."""
    i = torch.arange(len(seg))
    allow = (i[None, :] <= i[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    return torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)[None, None]


def load_examples(cfg, tokenizer, paths: list[str], seed: int, start: int = 0,
                  count: int | None = None, data=None) -> list[Example]:
    """Examples drawn (seeded) from the training files, in a fixed order: the first `cfg.examples`, or the
    `count` after the first `start` (prompts the MCTS does not label; indices restart at 0)."""
    pool = training_pool(cfg, tokenizer, paths, seed, data)
    return to_examples(cfg, tokenizer, pool[start : start + (cfg.examples if count is None else count)])


def training_pool(cfg, tokenizer, paths: list[str], seed: int, data=None) -> list[tuple[str, object]]:
    """Every candidate of the training sources, ("mc", MCItem) or ("text", window), in a seeded order. `data`: the
    run's RunData (each source read once per run); None: the sources are read here (generated text needs one)."""
    if data is None:
        from ..sources import RunData

        data = RunData()
    pool: list[tuple[str, object]] = []
    for j, path in enumerate(paths):
        src = data.get(path, "auto", f"routes.train.{j}")
        if src.layout in MC_LAYOUTS:
            pool += [("mc", it) for it in src.mc()]
        else:
            text = src.text()
            n = max(1, min(4096, len(tokenizer(text[:400000]).input_ids) // cfg.text_len))
            wins = calibration_windows(tokenizer, text, n, cfg.text_len, seed, path)
            pool += [("text", w) for w in wins]
    random.Random(seed).shuffle(pool)
    return pool


def to_examples(cfg, tokenizer, items: list[tuple[str, object]]) -> list[Example]:
    """Tokenised examples of pool entries (indices from 0; a choice question without usable tokens is left out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for kind, item in items:
        i = len(out)
        if kind == "mc":
            pairs = [encode_pair(tokenizer, item.context, ch) for ch in item.choices]
            ctx = pairs[0][0][-cfg.max_tokens:]
            if len(ctx) < 2 or any(not c for _, c in pairs):
                continue
            seqs = [ctx + c for _, c in pairs]
            width = max(len(s) for s in seqs)
            rows = torch.full((len(seqs), width), pad, dtype=torch.long)
            targets = []
            for r, (s, (_, cont)) in enumerate(zip(seqs, pairs, strict=True)):
                rows[r, : len(s)] = torch.tensor(s)
                pos = torch.arange(len(ctx) - 1, len(s) - 1)
                targets.append((pos, torch.tensor(cont)))
            # the evaluator's prefill holds the context but its last token (which starts the choices)
            out.append(Example(i, "mc", rows, torch.tensor([ctx[:-1]]), targets, item.label,
                               packed=_pack(ctx, [c for _, c in pairs])))
        else:
            w = item
            half = len(w) // 2
            out.append(Example(i, "text", w[None], w[None, :half], [(torch.arange(half - 1, len(w) - 1), w[half:])]))
    return out


class BlockRunner:
    """Runs the decoder block by block on fixed inputs, with the kwargs the model itself passes to its
    blocks (captured from one call, so any Llama-style model works)."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.get_decoder()
        self.blocks = decoder_layers(model)
        self.norm = arch.final_norm(model)
        self.evaluations = 0  # block calls

    @torch.no_grad()
    def inputs(self, ids: torch.Tensor, **extra):
        """Embeddings and the blocks' kwargs for `ids` (`extra`: position_ids, a 4D attention_mask)."""
        captured = {}

        class _Stop(Exception):
            pass

        def hook(_mod, args, kwargs):
            captured["h"] = args[0] if args else kwargs.pop("hidden_states")
            captured["kw"] = dict(kwargs)
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.decoder(input_ids=ids, use_cache=False, **extra)
        except _Stop:
            pass
        finally:
            handle.remove()
        kw = captured["kw"]
        kw.pop("hidden_states", None)
        return captured["h"], kw

    @torch.no_grad()
    def block(self, b: int, h: torch.Tensor, kw: dict) -> torch.Tensor:
        self.evaluations += 1
        out = self.blocks[b](h, **kw)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def logprobs(self, h: torch.Tensor, targets) -> list[float]:
        """Summed log-probability of each target's tokens (head only at the scored positions); target r
        reads row r of h, or row 0 when h is one packed row."""
        T = h.shape[1]
        flat = torch.cat([pos + (r if h.shape[0] > 1 else 0) * T for r, (pos, _) in enumerate(targets)])
        # one head call on the distinct positions (a packed row's choices share their first one)
        where, inverse = torch.unique(flat, return_inverse=True)
        logp = torch.log_softmax(arch.logits(self.model, self.norm(h.reshape(-1, h.shape[-1])[where])), -1)
        picked = logp[inverse, torch.cat([tok for _, tok in targets])]
        return [float(x.sum()) for x in picked.split([len(tok) for _, tok in targets])]


class PathScorer:
    """Reward of a path for one example, reusing the states of computed prefixes (trie, LRU-capped)."""

    def __init__(self, runner: BlockRunner, ex: Example, cfg):
        self.runner, self.ex, self.cfg = runner, ex, cfg
        if ex.packed is not None and runner.model.config._attn_implementation in ("eager", "sdpa"):
            ids, pos, seg, self.targets = ex.packed
            dtype = next(runner.blocks[0].parameters()).dtype
            self.h0, self.kw = runner.inputs(ids, position_ids=pos, attention_mask=packed_mask(seg, dtype))
        else:  # one row per choice (attention implementations that take no 4D mask)
            self.h0, self.kw = runner.inputs(ex.rows)
            self.targets = ex.targets
        self.states: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.computed = 0
        self.naive = 0
        self.dense_nll = None
        self.dense_lead = None

    def hidden(self, path: tuple) -> torch.Tensor:
        self.naive += len(path)
        h, k = self.h0, 0
        for i in range(len(path), 0, -1):
            if path[:i] in self.states:
                h, k = self.states[path[:i]], i
                self.states.move_to_end(path[:i])
                break
        for i in range(k, len(path)):
            h = self.runner.block(path[i], h, self.kw)
            self.computed += 1
            self.states[path[: i + 1]] = h
            if len(self.states) > self.cfg.prefix_cache:
                self.states.popitem(last=False)
        return h

    def __call__(self, path: tuple) -> float:
        lp = self.runner.logprobs(self.hidden(path), self.targets)
        if self.ex.kind == "mc":
            lead = lp[self.ex.label] - max(v for j, v in enumerate(lp) if j != self.ex.label)
            if self.dense_lead is None:  # the dense path is always scored first
                self.dense_lead = lead
            if lead <= 0:
                return 0.0
            if self.cfg.mc_reward == "correct" or self.dense_lead <= 0:
                return 1.0  # right answer (where dense is wrong: a fix)
            # binary correctness lets almost any two-block cut through on an example dense gets right (the
            # first one tried becomes the label); asking the path to keep dense's lead makes a label say
            # which blocks this input can do without
            return min(1.0, lead / self.dense_lead)
        nll = -lp[0] / len(self.ex.targets[0][1])
        if self.dense_nll is None:  # the dense path is always scored first
            self.dense_nll = nll
        return self.dense_nll / max(nll, 1e-9)


def success_of(ex: Example, cfg) -> float:
    if ex.kind == "mc":
        return 0.5 if cfg.mc_reward == "correct" else 1.0 / (1.0 + cfg.margin_tolerance)
    return 1.0 / (1.0 + cfg.text_tolerance)


def label_example(runner: BlockRunner, ex: Example, cfg, num_layers: int, seed: int, prior=None) -> dict:
    scorer = PathScorer(runner, ex, cfg)
    res = search_path(scorer, num_layers, simulations=cfg.simulations, c=cfg.c, lam=cfg.lam, epsilon=cfg.epsilon,
                      success=success_of(ex, cfg),
                      max_executed=cfg.max_executed if cfg.label_cap else None, min_saving=cfg.min_saving,
                      early_stop=cfg.early_stop, seed=seed, prior=prior, widening=cfg.widening)
    return {"index": ex.index, "label": list(res.label) if res.label is not None else None,
            "counts": list(res.counts) if res.counts is not None else None, "fixed": res.fixed,
            "dense_correct": res.dense_correct, "evaluations": res.evaluations, "simulations": res.simulations,
            "block_evals": scorer.computed, "block_evals_naive": scorer.naive}


def fingerprint(cfg, model, paths: list[str], seed: int) -> str:
    # `examples` is left out: example i is the same whatever the count, so a run may grow or shrink its set
    keys = {k: getattr(cfg, k) for k in ("label_cap", "simulations", "text_len", "max_tokens", "c",
                                        "lam", "epsilon", "min_saving", "early_stop", "text_tolerance",
                                        "mc_reward", "margin_tolerance", "expand", "widening")}
    if cfg.label_cap:  # the budget shapes the labels only when it caps them (else only the dial reads it)
        keys["max_executed"] = cfg.max_executed
    keys.update(paths=[str(p) for p in paths], seed=seed, L=len(decoder_layers(model)),
                d=model.config.hidden_size, model=str(getattr(model.config, "_name_or_path", "")))
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_file(folder: Path, i: int, n: int) -> Path:
    return folder / f"labels-{i}-of-{n}.jsonl"


def read_labels(path: Path) -> dict[int, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption is redone
            if isinstance(rec, dict) and isinstance(rec.get("index"), int):
                done[rec["index"]] = rec
    return done


class ShardPending(AdaflexError):
    """This worker's shard is labelled; training waits for the other shards."""

    exit_code = 1


def label_all(model, examples: list[Example], cfg, folder: Path, fp: str, seed: int, log=print,
              prior=None) -> list[dict]:
    """Label this worker's shard (resuming from its file), then return every shard's labels when all are
    done; raise ShardPending when other shards still miss examples. `prior`: MCTS expansion costs per block."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "labels-meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") != fp:
        raise UsageError(f"{folder}: holds labels of other settings, data or model; choose another labels_dir")
    meta.write_text(json.dumps({"fingerprint": fp}) + "\n")
    i, n = cfg.shard_of()
    mine = shard_file(folder, i, n)
    done = read_labels(mine)
    todo = [ex for ex in examples if ex.index % n == i and ex.index not in done]
    if done:
        log(f"routes: resuming labelling, {len(done)} examples of shard {i}/{n} already labelled")
    runner = BlockRunner(model)
    L = len(runner.blocks)
    io.drop_torn_tail(mine)  # else the next record would be appended to the torn line, and lost with it
    with open(mine, "a") as f:
        for ex in progress(todo, desc=f"MCTS labels {i}/{n}"):
            rec = label_example(runner, ex, cfg, L, seed * 1_000_003 + ex.index, prior)
            f.write(json.dumps(rec) + "\n")
            f.flush()
    records = {}
    missing = []
    for j in range(n):
        got = read_labels(shard_file(folder, j, n))
        want = [ex.index for ex in examples if ex.index % n == j]
        if any(k not in got for k in want):
            missing.append(j)
        records.update(got)
    if missing:
        raise ShardPending(f"routes: shard {i}/{n} labelled in {folder}; shards {missing} still running; "
                           "rerun any worker once they finish to train the routers")
    return [records[ex.index] for ex in examples]


def summary(records: list[dict], num_layers: int) -> dict:
    labelled = [r for r in records if r["label"] is not None]
    naive = sum(r["block_evals_naive"] for r in records)
    computed = sum(r["block_evals"] for r in records)
    return {
        "examples": len(records),
        "labelled": len(labelled),
        "fixes": sum(r["fixed"] for r in records),
        "dense_correct": sum(r["dense_correct"] for r in records),
        "label_executed_mean": (sum(len(r["label"]) for r in labelled) / len(labelled)) if labelled else None,
        "path_evaluations": sum(r["evaluations"] for r in records),
        "block_evals": computed,
        "block_evals_naive": naive,
        "prefix_reuse_saving": (1 - computed / naive) if naive else 0.0,
        "label_class_share": _class_share(labelled, num_layers),
    }


def _class_share(labelled: list[dict], L: int) -> list[float]:
    counts = [0, 0, 0]
    for r in labelled:
        for c in r["counts"]:
            counts[c] += 1
    total = max(1, sum(counts))
    return [round(c / total, 4) for c in counts]


def keep(records: list[dict], min_fix_share: float, seed: int) -> list[dict]:
    """Dr.LLM's enrichment; when no example is fixed, every labelled example is kept (reported)."""
    kept = enrich(records, min_fix_share, seed)
    if not kept:
        kept = [r for r in records if r["label"] is not None]
    return kept
