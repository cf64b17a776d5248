"""What the matrix's export round trip cannot see (issue 26): routes' masks on sliding-window layers while
decoding, and absolute positions (GPT-2) after the kv stage has evicted entries."""

from __future__ import annotations

import pytest
import torch

import adaflex.retrofit as af
from adaflex.retrofit import arch, registry
from adaflex.retrofit.routes.runtime import FixedPolicy, install
from tiny import GENERATED, tiny_family

pytestmark = pytest.mark.arch

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs back home across the field. " * 2


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
@torch.no_grad()
def test_routed_decoding_on_sliding_layers_matches_a_full_forward(family, one_thread):
    # block 0 repeated: its repeat keeps a cache slot of its own, whose mask must be its sliding layer's size
    model, tok = tiny_family(family)
    install(model, FixedPolicy(counts=(2, 1)))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] > 2 * arch.windows(model.config)[0]  # the window binds
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    steps = torch.stack([x[0] for x in out.logits])
    full = model(input_ids=out.sequences[:, :-1], use_cache=False).logits[0, ids.shape[1] - 1 :]
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_absolute_positions_continue_after_kv_eviction(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("ADAFLEX_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_family("gpt2")
    recipe = {"seed": 0, "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 64},
                                  "generated": GENERATED},
              "stages": [{"kv": registry.get("kv").contract_config()}]}
    af.run(recipe, model, tok, out=tmp_path / "run", log=lambda m: None)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    cache = arch.new_cache(model)
    model(input_ids=ids, cache=cache, use_cache=True)
    stored = cache.layers[0].keys.shape[-2]
    assert stored < ids.shape[1]  # entries were evicted
    seen = []
    hook = model.transformer.wpe.register_forward_pre_hook(lambda _m, a: seen.append(a[0].flatten().tolist()))
    try:
        model(input_ids=ids[:, -1:], cache=cache, use_cache=True)
    finally:
        hook.remove()
    assert seen == [[ids.shape[1]]]  # the next token's position counts the tokens seen, not those kept
