"""Tiny random Llama models (hidden 64, 4 blocks), one tiny model per architecture family (2 blocks), and a
byte-level tokenizer, built offline for tests."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def byte_tokenizer():
    """A 259-token byte-level tokenizer (256 bytes + 3 specials): no download, no training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<unk>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def tiny_llama(layers: int = 4, hidden: int = 64, seed: int = 0, vocab: int = 259):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 32,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=257,
                      eos_token_id=258, pad_token_id=258)
    model = LlamaForCausalLM(cfg)
    # Random init leaves blocks close to identity; larger weights make each block matter in tests.
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


# ---- one tiny model per family (issue 26, tests/arch/test_matrix.py), built offline from transformers' config
# classes: 2 blocks, hidden 64, the byte tokenizer's vocabulary ----

IDS = {"vocab_size": 259, "bos_token_id": 257, "eos_token_id": 258, "pad_token_id": 258}
LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, **IDS}
MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}

# family -> (config class name, settings). Sliding windows are shorter than the test prompts, so that a
# dropped window shows in the logits.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", {**LLAMA_LIKE, "sliding_window": 16}),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**LLAMA_LIKE, "head_dim": 16, "sliding_window": 16,
                                "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3": ("Gemma3TextConfig", {**LLAMA_LIKE, "head_dim": 16, "sliding_window": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {**LLAMA_LIKE, "pad_token_id": 258}),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "max_position_embeddings": 512, **IDS}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, **IDS}),
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "word_embed_proj_dim": 64, "max_position_embeddings": 512, **IDS}),
    "qwen2_moe": ("Qwen2MoeConfig", {**LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64}),
    "mixtral": ("MixtralConfig", {**LLAMA_LIKE, **MOE}),
}


def tiny_family(family: str, seed: int = 0):
    """(model, tokenizer): a tiny random model of `family` (eager attention, so every family runs the same code
    path on a CPU), its 2-D weights scaled up so that each block matters."""
    import torch
    import transformers

    cls, settings = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**settings)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(2.0)
    return model.eval(), byte_tokenizer()


def generated_logits(model, tok, text: str, new_tokens: int = 6):
    """Logits of a prefill and greedy decoding steps through the model's own cache [steps, vocab]: what a
    runtime part (routes decided at prefill, KV budgets evicting entries) changes shows up here."""
    import torch

    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    return torch.stack([x[0].float() for x in out.logits])


# `generated` text small enough for tiny models (8 sequences of 96 tokens: one batch, well under a second)
GENERATED = {"sequences": 8, "test_sequences": 4, "tokens": 96}


def shared_missing() -> str | None:
    """Why the tests that need ../shared/data cannot run here (None: they can)."""
    return None if SHARED.is_dir() else f"needs the project's real data in {SHARED} (absent in this clone)"


def require_shared() -> None:
    """Skip a test that needs ../shared/data in a clone without it; fail it under ADAFLEX_REQUIRE_SHARED=1 (.ci/run),
    where the data is promised."""
    import pytest

    why = shared_missing()
    if why is None:
        return
    if os.environ.get("ADAFLEX_REQUIRE_SHARED") == "1":
        pytest.fail(f"ADAFLEX_REQUIRE_SHARED=1: {why}", pytrace=False)
    pytest.skip(why)


def names_shared(recipe_file) -> bool:
    """A recipe file that names ../shared/data (the benchmarks, the per-method recipes)."""
    return "../shared/data" in Path(recipe_file).read_text()
