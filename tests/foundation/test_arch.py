"""The architecture adapter (retrofit/arch/): logits as transformers computes them, Gemma 2's softcapping
included, and a one-line refusal naming the model type and the missing piece for a model it does not know."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaflex.retrofit import arch
from adaflex.retrofit.errors import UsageError
from adaflex.retrofit.evaluate import perplexity
from adaflex.retrofit.prune.calibrate import capture
from adaflex.retrofit.prune.curves import Distortion, dense_trace
from tiny import byte_tokenizer, tiny_llama


def tiny_gemma2(cap: float = 2.0):
    """A tiny random Gemma 2 whose logits reach well past the softcap (its final norm scaled up)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                       final_logit_softcapping=cap, bos_token_id=257, eos_token_id=258, pad_token_id=258)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        model.get_decoder().norm.weight.fill_(30.0)  # Gemma's RMSNorm scales by (1 + weight)
    return model


def test_gemma2_softcapped_logits_and_nll_match_transformers():
    model, tok = tiny_gemma2(), byte_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :64]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        raw = model.get_output_embeddings()(arch.hidden_states(model, ids)).float()
        ours = arch.logits(model, arch.hidden_states(model, ids))
    assert raw.abs().max() > 4 * 2.0  # without the cap the logits would be far off: the test can fail
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the evaluator's NLL is transformers' NLL (one 64-token window, every next token scored)
    res = perplexity(model, tok, text, seq_len=64, limit=1)
    want = F.cross_entropy(ref[0, :-1], ids[0, 1:]).item()
    assert res.to_dict()["nll"] == pytest.approx(want, rel=1e-5)
    assert math.isclose(res.value, math.exp(want), rel_tol=1e-5)


def test_mse_distortion_without_the_gram_shortcut_measures_the_same(monkeypatch):
    """A softcapped model's prune distortion applies the head; with a cap too large to bend anything, that path
    gives what the Gram-matrix shortcut gives."""
    model = tiny_llama()
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = dense_trace(model, capture(model, ids))[-1]
    moved = [h + 0.1 * torch.randn_like(h) for h in dense]
    gram = Distortion(model, dense, "mse")
    assert gram.gram is not None
    monkeypatch.setattr(model.config, "final_logit_softcapping", 1e6, raising=False)
    explicit = Distortion(model, dense, "mse")
    assert explicit.gram is None
    assert explicit(moved) == pytest.approx(gram(moved), rel=1e-3)
    assert explicit(dense) == pytest.approx(0.0, abs=1e-9)


def _tiny(config_name: str, **kw):
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**kw))


@pytest.mark.parametrize("build, ask, piece", [
    (lambda: _tiny("BloomConfig", n_layer=2, hidden_size=32, n_head=2, vocab_size=64), arch.decoder_layers,
     "'bloom': adaflex does not know its decoder blocks"),
    (lambda: _tiny("BloomConfig", n_layer=2, hidden_size=32, n_head=2, vocab_size=64), arch.check,
     "'bloom': adaflex does not know its block layout (BloomBlock matches no known family"),
    (lambda: _tiny("GPTJConfig", n_layer=2, n_embd=32, n_head=2, vocab_size=64, rotary_dim=8,
                   bos_token_id=0, eos_token_id=0),
     lambda m: arch.attention(m, arch.decoder_layers(m)[0]), "'gptj': adaflex does not know its block layout"),
])
def test_unknown_architecture_is_a_one_line_refusal(build, ask, piece):
    model = build()
    if ask is arch.decoder_layers:  # a decoder whose block list is under another name
        model.get_decoder().blocks = model.get_decoder().h
        del model.get_decoder().h
    with pytest.raises(UsageError) as err:
        ask(model)
    msg = str(err.value)
    assert piece in msg and "\n" not in msg


@pytest.mark.parametrize("build, blocks, roles", [
    (lambda: _tiny("GPT2Config", n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0),
     "h", {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}),
    (lambda: _tiny("OPTConfig", num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                   vocab_size=64, word_embed_proj_dim=32), "layers",
     {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
      "up": "fc1", "down": "fc2"}),
    (lambda: _tiny("GPTNeoXConfig", num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                   num_attention_heads=2, vocab_size=64), "layers",
     {"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
      "down": "mlp.dense_4h_to_h"}),
])
def test_other_families_parts_are_found(build, blocks, roles):
    model = build()
    assert arch.blocks_name(model) == blocks and arch.role_names(model) == roles
    assert arch.kv_heads(model.config) == 2  # multi-head attention without num_key_value_heads
    block = arch.decoder_layers(model)[0]
    found = arch.roles(model, block)
    assert all(found[r] is arch.find(block, p) for r, p in roles.items())
    assert arch.final_norm(model) is not None and not arch.layout(model).gated


def test_kv_heads_default_to_heads_and_llama_parts_are_found():
    model = tiny_llama()
    assert arch.kv_heads(model.config) == 2 and arch.head_dim(model.config) == 16
    del model.config.num_key_value_heads
    assert arch.kv_heads(model.config) == 4  # multi-head attention: one KV head per query head
    block = arch.decoder_layers(model)[0]
    assert arch.attention(model, block) is block.self_attn and arch.mlp(model, block) is block.mlp
    assert arch.norms(model, block) == (block.input_layernorm, block.post_attention_layernorm)
    assert arch.final_norm(model) is model.model.norm and arch.softcap(model.config) is None


def test_eval_of_an_unknown_architecture_exits_2_in_one_line(tmp_path, text_file):
    from typer.testing import CliRunner

    from adaflex.cli.main import app

    model = _tiny("BloomConfig", n_layer=2, hidden_size=32, n_head=2, vocab_size=259, bos_token_id=257,
                  eos_token_id=258)
    model.save_pretrained(tmp_path / "bloom")
    byte_tokenizer().save_pretrained(tmp_path / "bloom")
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "bloom"), "--task", "perplexity", "--data", str(text_file),
                                   "--seq-len", "32", "--limit", "1"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaflex: error: model type 'bloom': adaflex does not know its "
                                                   "block layout"), res.stderr


@pytest.mark.parametrize("family, kinds", [
    ("mistral", [16, 16]),  # a sliding_window and no layer_types: every layer slides
    ("qwen2", [None, None]),  # use_sliding_window: false
    ("gemma2", [16, None]),  # layer_types alternate
    ("llama", [None, None]),
])
def test_attention_kinds_follow_transformers_config_keys(family, kinds):
    import transformers

    from tiny import FAMILIES

    cls, settings = FAMILIES[family]
    assert arch.windows(getattr(transformers, cls)(**settings)) == kinds


def test_moe_dense_macs_count_top_k_experts_router_and_shared_expert():
    from tiny import tiny_family

    model, _ = tiny_family("qwen2_moe")
    c = model.config
    d, hd = c.hidden_size, arch.head_dim(c)
    attn = d * c.num_attention_heads * hd * 2 + 2 * d * c.num_key_value_heads * hd
    experts = c.num_experts_per_tok * 3 * d * c.moe_intermediate_size  # gate, up, down of the k chosen
    shared = 3 * d * c.shared_expert_intermediate_size + d  # its MLP and its 1-wide gate
    router = c.num_experts * d
    want = c.num_hidden_layers * (attn + experts + shared + router) + d * c.vocab_size
    assert arch.reference_of(model)["linear_macs_per_token"] == want


def test_gemma_norm_before_the_mlp_is_pre_feedforward():
    from tiny import tiny_family

    model, _ = tiny_family("gemma3")
    block = arch.decoder_layers(model)[0]
    assert arch.norms(model, block) == (block.input_layernorm, block.pre_feedforward_layernorm)
    assert arch.role_names(model)["gate"] == "mlp.gate_proj"
