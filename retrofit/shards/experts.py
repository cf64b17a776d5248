"""LoRA on the experts a MoE stores as 3-D parameters (transformers 5's Mixtral / Qwen2-MoE `mlp.experts`:
`gate_up_proj` [E, 2·I, H], `down_proj` [E, H, I], each slice [out, in] as `F.linear` takes it), with the math of
peft's `ParamWrapper` (peft/tuners/lora/layer.py, `LoraConfig(target_parameters=...)`), so the peft export and the
merge give the run's logits:

- one rank-r LoRA per expert: A_e [r, in], B_e [out, r], slice e of the weight becomes W_e + B_e·A_e·alpha/r
  (an experts module with `is_transposed` stores [E, in, out] and gets the transpose);
- applied as peft applies it: for the experts module's forward only, the parameter is parametrized (torch's
  `nn.utils.parametrize`) as W + scale·B·A, one `baddbmm` for all experts, and the plain parameter is put
  back after, so weight names, `is_experts` and the cost counters see the module as it was;
- no dropout: a dropout on the input cannot be factored out of a weight delta (peft refuses lora_dropout there).

`Site` is one 3-D parameter of an experts module, standing where an nn.Linear stands for the linear adapters
(`weight`, `adaflex_delta`); the deltas live on the experts module as `adaflex_experts[param]`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch import is_experts, is_router


class ExpertsDelta(nn.Module):
    """Per-expert LoRA factors of one 3-D parameter: A [E, r, in], B [E, out, r]."""

    adaflex_adapter = True  # 3-D factors, yet no experts module (arch.is_experts: not counted as weights or MACs)

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool):
        super().__init__()
        self.rank, self.scale, self.transposed = a.shape[1], scale, transposed
        self.adaflex_a = nn.Parameter(a.clone())
        self.adaflex_b = nn.Parameter(b.clone())
        self.enabled = True

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adaflex_a, self.adaflex_b

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the parameter's own layout ([E, out, in], or [E, in, out] when transposed)."""
        dw = torch.bmm(self.adaflex_b.float(), self.adaflex_a.float()) * self.scale
        return dw.mT if self.transposed else dw


class _Fold(nn.Module):
    """The parametrization W -> W + scale·B·A (peft's `_LoraFactorsProxy`); the delta is referenced, not owned."""

    def __init__(self, delta: ExpertsDelta):
        super().__init__()
        object.__setattr__(self, "delta", delta)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a, b = (t.to(w.dtype) for t in self.delta.factors())
        lhs, rhs = (a.mT, b.mT) if self.delta.transposed else (b, a)
        return torch.baddbmm(w, lhs, rhs, alpha=self.delta.scale)


class Site:
    """One 3-D parameter `name` of an experts module, as the adapter code sees a linear."""

    def __init__(self, experts: nn.Module, name: str):
        self.experts, self.name = experts, name

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.name)

    @property
    def transposed(self) -> bool:
        return bool(getattr(self.experts, "is_transposed", False))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def dims(self) -> tuple[int, int]:
        """(d_in, d_out) of one expert's slice."""
        _, x, y = self.weight.shape
        return (x, y) if self.transposed else (y, x)

    @property
    def adaflex_delta(self) -> ExpertsDelta:
        return self.experts.adaflex_experts[self.name]


def find(block: nn.Module, target: str) -> list[tuple[str, Site]]:
    """The 3-D parameters of the block's experts modules that `target` (`experts.gate_up_proj`) names, as peft's
    `target_parameters` matches them: the module path + parameter name, or a dotted suffix of it."""
    out = []
    for n, m in block.named_modules():
        if not is_experts(m):
            continue
        for p, _ in m.named_parameters(recurse=False):
            key = f"{n}.{p}"
            if key == target or key.endswith(f".{target}"):
                out.append((key, Site(m, p)))
    return out


def _forward(experts: nn.Module, *args, **kwargs):
    """The experts module's forward with every enabled delta folded into its parameter for this call."""
    deltas = {n: d for n, d in experts.adaflex_experts.items() if d.enabled}
    cls_forward = type(experts).forward
    if not deltas:
        return cls_forward(experts, *args, **kwargs)
    for name, d in deltas.items():
        grad = getattr(experts, name).requires_grad
        parametrize.register_parametrization(experts, name, _Fold(d))
        experts.parametrizations[name].original.requires_grad_(grad)
    try:
        with parametrize.cached():  # the folded weight once per call, even where the forward reads it per expert
            return cls_forward(experts, *args, **kwargs)
    finally:
        for name in deltas:  # the original nn.Parameter object goes back (leave_parametrized=False)
            parametrize.remove_parametrizations(experts, name, leave_parametrized=False)


def attach(site: Site, delta: ExpertsDelta) -> None:
    experts = site.experts
    detach(site)
    delta.train(experts.training)
    if "adaflex_experts" not in experts._modules:
        experts.adaflex_experts = nn.ModuleDict()
    experts.adaflex_experts[site.name] = delta
    experts.forward = partial(_forward, experts)


def detach(site: Site) -> None:
    experts = site.experts
    held = experts._modules.get("adaflex_experts")
    if held is None:
        return
    if site.name in held:
        del held[site.name]
    if not len(held):
        del experts._modules["adaflex_experts"]
        experts.__dict__.pop("forward", None)


def adapted(model) -> list[tuple[str, Site]]:
    """(`{module}.{param}`, site) of every adapted 3-D parameter (peft's name for the parameter)."""
    return [(f"{n}.{p}", Site(m, p)) for n, m in model.named_modules()
            if isinstance(m._modules.get("adaflex_experts"), nn.ModuleDict) for p in m.adaflex_experts]


@torch.no_grad()
def merge(site: Site) -> None:
    site.weight.add_(site.adaflex_delta.delta_weight().to(site.weight.dtype))


def top_k(block: nn.Module) -> int:
    """Experts a token passes through in this block (its router's `top_k`)."""
    ks = [m.top_k for m in block.modules() if is_router(m)]
    return int(ks[0]) if ks else 1


def peft_tensors(name: str, a: torch.Tensor, b: torch.Tensor, nesting: int) -> dict[str, torch.Tensor]:
    """peft's tensors of one targeted 3-D parameter from A [E, r, in] and B [E, out, r]: lora_A.weight
    [E·r, in] (expert-major rows), lora_B.weight [out, r·E] (column k·E + e is B_e's column k: peft reshapes it
    (out, r, E)). The module is `name` less the parameter; each further targeted parameter of the same module
    wraps the earlier ones (peft wraps them in the module's parameter order), so this one sits under `nesting`
    `base_layer.`s."""
    module = name.rsplit(".", 1)[0] + ".base_layer" * nesting
    e, r, d_in = a.shape
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], r * e)
    return {f"base_model.model.{module}.lora_A.weight": a.reshape(e * r, d_in).contiguous().cpu(),
            f"base_model.model.{module}.lora_B.weight": lora_b.contiguous().cpu()}


def nestings(names: list[str], model) -> dict[str, int]:
    """name -> how many targeted parameters of its module come after it (in the module's parameter order)."""
    out = {}
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(n.rsplit(".", 1)[0], []).append(n.rsplit(".", 1)[1])
    for mod, params in by_module.items():
        order = [p for p, _ in model.get_submodule(mod).named_parameters(recurse=False) if p in params]
        for i, p in enumerate(order):
            out[f"{mod}.{p}"] = len(order) - 1 - i
    return out
