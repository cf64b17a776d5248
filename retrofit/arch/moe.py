"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE): Llama-style attention, and an MLP that is a router
(`mlp.gate`, a [experts, hidden] weight choosing `top_k` experts per token), the experts as 3-D parameters
(`mlp.experts.gate_up_proj` [experts, 2·intermediate, hidden], `down_proj` [experts, hidden, intermediate], as
transformers 5 stores them) and, in Qwen2-MoE, a shared expert every token passes with its own 1-wide gate."""

from __future__ import annotations

import torch

from .base import Layout
from .llama import ATTENTION, NORMS

MIXTRAL = Layout("mixture-of-experts", blocks="layers", attention="self_attn", mlp="mlp", norms=NORMS,
                 final_norm="norm", roles={**ATTENTION, "router": "mlp.gate", "experts": "mlp.experts"})

SHARED = Layout("mixture-of-experts with a shared expert", blocks="layers", attention="self_attn", mlp="mlp",
                norms=NORMS, final_norm="norm",
                roles={**MIXTRAL.roles, "shared_gate": "mlp.shared_expert.gate_proj",
                       "shared_up": "mlp.shared_expert.up_proj", "shared_down": "mlp.shared_expert.down_proj",
                       "shared_router": "mlp.shared_expert_gate"})


def is_experts(module: torch.nn.Module) -> bool:
    """An experts module: its own parameters are 3-D, one [out, in] slice per expert. An adapter's per-expert
    factors (shards/experts.py, marked `adaflex_adapter`) are 3-D too, but neither weights nor MACs of the model."""
    if getattr(module, "adaflex_adapter", False):
        return False
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.dim() == 3 for p in own)


def expert_macs(module: torch.nn.Module) -> int:
    """MACs of one token through one expert (one slice of each 3-D parameter)."""
    return sum(p[0].numel() for p in module.parameters(recurse=False))


def is_router(module: torch.nn.Module) -> bool:
    """A top-k router that is not an nn.Linear (transformers 5's `*TopKRouter`: a 2-D `weight` and `top_k`)."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.nn.Parameter) and w.dim() == 2 and hasattr(module, "top_k")

