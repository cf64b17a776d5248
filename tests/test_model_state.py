"""`model.adaflex` owns what the methods attach and the patches they install (retrofit/state.py): undoing
every patch gives back the plain transformers model's logits."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

import adaflex.retrofit as af
from adaflex.retrofit.state import state_of, undo_all
from tiny import GENERATED, generated_logits

TEXT = "A tiny model reads this sentence twice, then keeps reading it until the cache is half full. " * 2

# every runtime patch at once: adapted linears (shards), the routed decoder (routes), the KV attention and
# generate()'s cache (kv); the fused add + norm comes with adaflex's own load
RECIPE = {
    "seed": 0,
    "data": {"calibration": {"path": "generated", "samples": 4, "seq_len": 64}, "generated": GENERATED},
    "stages": [
        {"shards": {"method": "mos", "rank": 4, "equivalent_rank": 2, "shards_per_vector": 4, "steps": 2,
                    "batch_size": 2, "lr": 0.05}},
        {"routes": {"path": [0, 1, 1, 3]}},
        {"kv": {"budget": 0.5, "allocation": "uniform", "policy": "snapkv", "sinks": 2, "window": 8, "kernel": 3}},
    ],
}


def test_undoing_every_patch_gives_the_plain_transformers_model(tiny_dir, tmp_path, one_thread):
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    tok = af.load(str(tiny_dir))[1]
    want = generated_logits(plain, tok, TEXT)

    model, tok = af.load(str(tiny_dir))
    af.run(RECIPE, model, tok, model_name=str(tiny_dir), log=lambda m: None)
    st = state_of(model)
    assert set(st.patches) == {"fused", "shards", "routes", "kv"}
    assert st.plan["stages"] and st.dense and st.kv is not None and st.routes is not None
    patched = generated_logits(model, tok, TEXT)
    assert not torch.allclose(patched, want, atol=1e-3)

    # a copy owns its own patches: undoing them leaves the original as it was
    twin = copy.deepcopy(model)
    undo_all(twin)
    torch.testing.assert_close(generated_logits(model, tok, TEXT), patched, rtol=0, atol=0)

    undo_all(model)
    for m in (model, twin):
        assert not state_of(m).patches and state_of(m).kv is None and state_of(m).routes is None
        assert not [n for n, _ in m.named_modules() if "adaflex" in n]
        assert "_prepare_cache_for_generation" not in m.__dict__
        assert all(type(b) is type(plain.model.layers[0]) for b in m.model.layers)
        assert m.config._attn_implementation == plain.config._attn_implementation
        torch.testing.assert_close(generated_logits(m, tok, TEXT), want, rtol=0, atol=1e-5)
