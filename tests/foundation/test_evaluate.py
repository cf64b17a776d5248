"""The evaluator agrees with naive full-forward computations; cost figures are measured, not assumed."""

from __future__ import annotations

import math

import pytest
import torch

from adaflex.retrofit.data import MCItem
from adaflex.retrofit.evaluate import choice_logliks, continuation_perplexity, cost_figures, mc_scores, perplexity


def _naive_nll(model, ids):
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item(), ids.numel() - 1


def test_strided_perplexity_matches_naive(tiny, text_file):
    model, tok = tiny
    text = text_file.read_text()[:2000]
    res = perplexity(model, tok, text, seq_len=64, batch_size=3, limit=5)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    total, n = 0.0, 0
    for w in range(5):
        a, b = _naive_nll(model, ids[w * 64 : (w + 1) * 64])
        total, n = total + a, n + b
    assert res.n == 5 and res.extra["scored_tokens"] == n
    assert res.value == pytest.approx(math.exp(total / n), rel=1e-4)


def test_overlapping_stride_scores_only_new_tokens(tiny, text_file):
    model, tok = tiny
    res = perplexity(model, tok, text_file.read_text()[:1000], seq_len=64, stride=32, limit=4)
    assert res.extra["scored_tokens"] == 63 + 3 * 32


def test_continuation_through_cache_matches_full_forward(tiny, text_file):
    model, tok = tiny
    text = text_file.read_text()[:3000]
    res = continuation_perplexity(model, tok, text, context=40, continuation=12, batch_size=2, limit=3)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    total = 0.0
    for w in range(3):
        x = ids[w * 52 : (w + 1) * 52]
        with torch.no_grad():
            logits = model(x[None]).logits[0].float()
        total += torch.nn.functional.cross_entropy(logits[39:51], x[40:52], reduction="sum").item()
    assert res.extra["scored_tokens"] == 36
    assert res.value == pytest.approx(math.exp(total / 36), rel=1e-4)


def test_choice_logliks_match_naive_and_ignore_batching(tiny):
    model, tok = tiny
    items = [MCItem("Question: what is red?\nAnswer:", (" apple", " sky", " grass blade"), 0),
             MCItem("The cat sat on the", (" mat", " moon"), 1)]
    a, _ = choice_logliks(model, tok, items, batch_size=1)
    b, _ = choice_logliks(model, tok, items, batch_size=5)
    for i, it in enumerate(items):
        ctx = tok(it.context, add_special_tokens=False).input_ids
        for j, ch in enumerate(it.choices):
            full = tok(it.context + ch, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            naive = sum(logp[p - 1, full[p]].item() for p in range(len(ctx), len(full)))
            assert a[i][j] == pytest.approx(naive, abs=1e-3)
            assert b[i][j] == pytest.approx(naive, abs=1e-3)


def test_mc_scores_acc_and_norm():
    items = [MCItem("c", (" a", " bbbbbbbbbb"), 1), MCItem("c", (" a", " b"), 0)]
    # item 0: raw loglik prefers the short choice, per-character prefers the long one
    s = mc_scores(items, [[-2.0, -5.0], [-1.0, -3.0]])
    assert s == {"acc": 0.5, "acc_norm": 1.0}


def test_cost_figures_dense_are_unity(tiny):
    model, _ = tiny
    c = cost_figures(model, torch.randint(0, 250, (2, 16)))
    assert c["layers_executed_mean"] == 4 and c["num_layers"] == 4
    assert c["kv_bytes_ratio"] == pytest.approx(1.0) and c["flops_ratio"] == pytest.approx(1.0)
    assert c["sparsity"] == pytest.approx(0.0) and c["trainable_params"] == 0
