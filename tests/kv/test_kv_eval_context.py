"""An evaluation reports the KV bytes held at its own context beside the 128-token probe's (issue 26): a per-head
plan whose floor of sinks + window dominates a 128-token prompt holds its budget at the evaluation's length."""

from __future__ import annotations

import pytest
import torch

from adaflex.retrofit.evaluate import run_eval
from adaflex.retrofit.kv.apply import install, spec_from, uninstall
from adaflex.retrofit.kv.config import KVConfig
from tiny import byte_tokenizer, tiny_llama

TEXT = " ".join(f"sentence {i} about tiny models." for i in range(400))


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _eval(model):
    return run_eval(model, byte_tokenizer(), "perplexity", "inline", seq_len=512, limit=1, batch_size=2,
                    source=_Text())


class _Text:
    def text(self):
        return TEXT


def test_dense_model_holds_its_full_cache_at_both_lengths(model):
    uninstall(model)
    res = _eval(model)
    assert res["kv_context"] == 512
    assert res["kv_bytes_ratio"] == pytest.approx(1.0) and res["kv_bytes_ratio_at_context"] == pytest.approx(1.0)
    # K and V, 4 layers, 2 KV heads of 16, fp32, 512 tokens
    assert res["kv_bytes_at_context"] == 2 * 4 * 2 * 16 * 4 * 512


@torch.no_grad()
def test_per_head_plan_holds_its_budget_at_its_own_context(model):
    n = model.config.num_hidden_layers
    # the floor (sinks 4 + window 32 = 36 tokens per head) is 28% of the 128-token probe, 7% of 512 tokens
    spec = spec_from(KVConfig(budget=0.25, policy="streaming", sinks=4, window=32), n,
                     head_fractions=[[0.4, 0.1]] * n)
    install(model, spec)
    try:
        res = _eval(model)
        cache = model.adaflex.make_cache()
        model(torch.randint(0, 250, (1, 512)), cache=cache, use_cache=True)
    finally:
        uninstall(model)
    assert res["kv_bytes_ratio"] == pytest.approx(36 / 128)  # 0.281: every head at the floor
    assert abs(res["kv_bytes_ratio_at_context"] - 0.25) < abs(res["kv_bytes_ratio"] - 0.25)
    assert res["kv_bytes_ratio_at_context"] == pytest.approx(0.25, abs=1e-3)
    # what the cache really holds at 512 tokens: the plan's per-head counts, each head stored apart
    held = int(spec.static_head_counts(512).sum()) * 2 * 16 * 4
    assert res["kv_bytes_at_context"] == cache.stored_bytes() == held
