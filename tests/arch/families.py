"""Tiny random models of each family adaflex is asked about (issue 26), built offline from transformers' config
classes: 2 blocks, hidden 32–64, the byte tokenizer's 259-token vocabulary (tests/tiny.py)."""

from __future__ import annotations

from tiny import byte_tokenizer

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
