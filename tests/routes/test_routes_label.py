"""MCTS labelling: rewards, prefix reuse counts, sharding and resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from adaflex.retrofit.routes.config import RoutesConfig
from adaflex.retrofit.routes.label import BlockRunner, PathScorer, ShardPending, label_all, label_example, load_examples
from adaflex.retrofit.routes.runtime import FixedPolicy, forced_paths, install, path_counts, runtime_of, uninstall
from adaflex.search.mcts import prefix_reuse
from tiny import byte_tokenizer, tiny_llama

ARC = "../shared/data/arc_easy_train.jsonl"


@pytest.fixture(scope="module")
def setup():
    return tiny_llama(), byte_tokenizer()


def test_prefix_reuse_counts_and_rewards_match_runtime(setup):
    model, tok = setup
    cfg = RoutesConfig(examples=2, simulations=12, train=[ARC], early_stop=False, max_tokens=40)
    ex = load_examples(cfg, tok, [ARC], seed=0)[0]
    runner = BlockRunner(model)
    rec = label_example(runner, ex, cfg, 4, seed=1)
    assert rec["block_evals_naive"] > rec["block_evals"] > 0
    # the scorer's count is exactly the trie count of search/mcts.py for the paths it evaluated
    scorer = PathScorer(runner, ex, cfg)
    paths = [(0, 1, 2, 3), (0, 1, 3), (0, 2, 3), (0, 1, 1, 2, 3), (1, 2, 3)]
    rewards = [scorer(p) for p in paths]
    pr = prefix_reuse(paths, mode="trie")
    assert (scorer.computed, scorer.naive) == (pr.computed, pr.naive) == (13, 18)
    # the reward of a path is the runtime's answer under that path: `margin` (default) and `correct`
    binary = PathScorer(runner, ex, RoutesConfig(**{**cfg.model_dump(), "mc_reward": "correct"}))
    leads = []
    with torch.no_grad():
        for p, r in zip(paths, rewards, strict=True):
            install(model, FixedPolicy(counts=path_counts(p, 4)))
            try:
                logits = model(ex.rows, use_cache=False).logits
            finally:
                uninstall(model)
            lp = [torch.log_softmax(logits[i, pos], -1)[torch.arange(len(t)), t].sum().item()
                  for i, (pos, t) in enumerate(ex.targets)]
            right = max(range(len(lp)), key=lp.__getitem__) == ex.label
            assert binary(p) == float(right)
            lead = lp[ex.label] - max(v for j, v in enumerate(lp) if j != ex.label)
            leads.append(lead)
            if not right:
                assert r == 0.0
            elif leads[0] <= 0:  # dense wrong: any right answer is a fix
                assert r == 1.0
            else:
                assert r == pytest.approx(min(1.0, lead / leads[0]), rel=1e-4, abs=1e-6)
    assert rewards[0] in (0.0, 1.0)  # dense scores itself 1 when right
    with forced_paths(model, [paths[1]]):
        pass  # forcing without a call leaves nothing behind
    assert runtime_of(model) is None or runtime_of(model)._forced is None


def test_packed_row_scores_as_one_row_per_choice(setup):
    # the context runs once, each choice after it under the 4D mask: same log-likelihoods as the padded rows
    model, tok = setup
    cfg = RoutesConfig(examples=4, train=[ARC], max_tokens=40)
    exs = [ex for ex in load_examples(cfg, tok, [ARC], seed=0) if ex.kind == "mc"]
    assert exs
    runner = BlockRunner(model)
    for ex in exs:
        packed = PathScorer(runner, ex, cfg)
        rows = PathScorer(runner, dataclasses.replace(ex, packed=None), cfg)
        assert packed.h0.shape[:2] == (1, ex.packed[0].shape[1]) and rows.h0.shape[0] == len(ex.targets)
        assert packed.h0.shape[1] < ex.rows.numel()  # fewer tokens per block evaluation
        for path in [(0, 1, 2, 3), (0, 2, 3), (1, 1, 3)]:
            got = runner.logprobs(packed.hidden(path), packed.targets)
            want = runner.logprobs(rows.hidden(path), rows.targets)
            assert got == pytest.approx(want, abs=1e-3)
        assert len({round(v, 3) for v in want}) > 1  # the choices differ: a mixed-up target would show


def test_margin_reward_keeps_the_lead_of_dense_within_tolerance():
    from adaflex.retrofit.routes.label import Example, success_of

    class Fixed(PathScorer):  # log-likelihoods per path, no model
        def __init__(self, table, cfg):
            self.cfg, self.ex, self.targets = cfg, Example(0, "mc", None, None, [], label=0), []
            self.dense_nll = self.dense_lead = None

        def hidden(self, path):
            return path

    table = {(0, 1, 2): [-1.0, -3.0], (0, 2): [-1.5, -3.0], (1, 2): [-2.9, -3.0], (2,): [-3.5, -3.0]}
    cfg = RoutesConfig(margin_tolerance=0.1)
    s = Fixed(table, cfg)
    s.runner = type("R", (), {"logprobs": lambda self, h, t: table[h]})()
    got = [s(p) for p in table]
    assert got == pytest.approx([1.0, 0.75, 0.05, 0.0])  # leads 2, 1.5, 0.1, -0.5 against dense's 2
    ok = success_of(s.ex, cfg)
    assert [g >= ok for g in got] == [True, False, False, False]  # 0.75 < 1/1.1: still right, but not kept
    assert success_of(s.ex, RoutesConfig(mc_reward="correct")) == 0.5


def test_sharded_labelling_resumes(setup, tmp_path):
    model, tok = setup
    base = dict(examples=3, simulations=3, train=[ARC], max_tokens=32)
    exs = load_examples(RoutesConfig(**base), tok, [ARC], seed=0)
    with pytest.raises(ShardPending, match="shards \\[1\\]"):
        label_all(model, exs, RoutesConfig(**base, shard="0/2"), tmp_path, "fp", 0, log=lambda m: None)
    f0 = tmp_path / "labels-0-of-2.jsonl"
    assert len(f0.read_text().splitlines()) == 2  # examples 0 and 2
    recs = label_all(model, exs, RoutesConfig(**base, shard="1/2"), tmp_path, "fp", 0, log=lambda m: None)
    assert [r["index"] for r in recs] == [0, 1, 2]
    stamp = f0.read_text()
    again = label_all(model, exs, RoutesConfig(**base, shard="0/2"), tmp_path, "fp", 0, log=lambda m: None)
    assert f0.read_text() == stamp and again == recs  # resumed: nothing relabelled
    from adaflex.retrofit.errors import UsageError

    with pytest.raises(UsageError, match="other settings"):
        label_all(model, exs, RoutesConfig(**base), tmp_path, "other", 0)
    assert json.loads((tmp_path / "labels-meta.json").read_text())["fingerprint"] == "fp"


def test_label_fingerprint_reads_the_budget_only_when_it_caps_labels(setup):
    from adaflex.retrofit.routes.label import fingerprint

    model, _ = setup
    fp = {(cap, budget): fingerprint(RoutesConfig(max_executed=budget, label_cap=cap), model, [ARC], 0)
          for cap in (False, True) for budget in (3, 2.5)}
    assert fp[False, 3] == fp[False, 2.5]  # uncapped labels do not depend on the budget: a new dial reuses them
    assert fp[True, 3] != fp[True, 2.5] and fp[True, 3] != fp[False, 3]
