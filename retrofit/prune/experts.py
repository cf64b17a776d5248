"""Experts stored as 3-D parameters (transformers 5 MoE: `gate_up_proj` [experts, 2·inter, hidden] and
`down_proj` [experts, hidden, inter]) seen by the pruner as one [out, in] matrix per expert, and Wanda's input
statistics for each slice taken from the tokens the router sent to that expert only (issue 26)."""

from __future__ import annotations

import torch

from ..arch import is_experts

PARAMS = ("gate_up_proj", "down_proj")  # the one experts layout whose forward we can re-trace for statistics


class ExpertSlice:
    """Expert `expert` of the 3-D parameter `pname` of an experts module, shaped like an nn.Linear for the
    pruner (`weight` [out, in], `in_features`). `weight` is a view of the parameter's storage, so masking it
    masks the expert in place."""

    def __init__(self, module: torch.nn.Module, pname: str, expert: int):
        self.module, self.pname, self.expert = module, pname, expert

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.pname).data[self.expert]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def slices(name: str, module: torch.nn.Module) -> list[tuple[str, ExpertSlice]]:
    """(`{name}.{param}.{expert}`, slice) for every expert of every 3-D parameter, parameter by parameter."""
    return [(f"{name}.{p}.{e}", ExpertSlice(module, p, e))
            for p, t in module.named_parameters(recurse=False) for e in range(t.shape[0])]


def unsupported(module: torch.nn.Module) -> str | None:
    """Why the statistics hook cannot re-trace this experts module (None: it can)."""
    names = tuple(n for n, _ in module.named_parameters(recurse=False))
    if names != PARAMS:
        return f"experts with parameters {', '.join(names)} (prune knows {', '.join(PARAMS)})"
    odd = [a for a, ok in (("is_transposed", False), ("has_bias", False), ("has_gate", True),
                           ("is_concatenated", True), ("has_post_expert_norm", False))
           if getattr(module, a, ok) != ok]
    return f"experts with {', '.join(odd)} set otherwise" if odd else None


def stats_hook(module: torch.nn.Module, name: str, wanted: set[str], stats: dict):
    """A forward hook accumulating Σx² per input feature of the wanted slices of `module` (named `name`):
    `gate_up_proj[e]` sees the hidden states of the tokens routed to expert e, `down_proj[e]` the gated
    activations of those tokens (re-computed from the current weights, as the expert's forward does)."""

    def hook(mod, args, kwargs, _out):
        x = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x = x.detach().reshape(-1, x.shape[-1])
        w_gu = mod.gate_up_proj.data
        for e in range(w_gu.shape[0]):
            k_gu, k_down = f"{name}.gate_up_proj.{e}", f"{name}.down_proj.{e}"
            if k_gu not in wanted and k_down not in wanted:
                continue
            xe = x[(index == e).any(-1)].float()
            _add(stats, k_gu, (xe * xe).sum(0))
            if k_down in wanted:
                gu = torch.nn.functional.linear(xe, w_gu[e].float())
                h = mod._apply_gate(gu) if hasattr(mod, "_apply_gate") else _gate(mod, gu)
                _add(stats, k_down, (h * h).sum(0))

    return hook


def _gate(mod, gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)  # transformers' default: [gate; up] concatenated
    return mod.act_fn(gate) * up


def _add(stats: dict, key: str, sq: torch.Tensor) -> None:
    stats[key] = stats[key] + sq if key in stats else sq


def no_tokens(stats: dict, names) -> dict:
    """An expert no calibration token reached has all-zero statistics, which would rank its weights by position:
    it is scored by magnitude instead (statistics of ones)."""
    for n in names:
        if n in stats and not bool((stats[n] > 0).any()):
            stats[n] = torch.ones_like(stats[n])
    return stats


def experts_modules(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in block.named_modules() if is_experts(m)]
