"""What every family module shares: the `Layout` record, the model type and the one-line refusal."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UsageError


def text_config(config):
    """The language model's config (a multimodal config nests it)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def model_type(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return str(getattr(config, "model_type", None) or type(config).__name__)


def unknown(model_or_config, piece: str) -> UsageError:
    """The one-line refusal for a model whose `piece` adaflex cannot find (README.md, Supported families)."""
    return UsageError(f"model type '{model_type(model_or_config)}': adaflex does not know {piece} "
                      "(README.md, Supported families)")


def refuse(model_or_config, where: str, what: str) -> UsageError:
    """A method's one-line refusal of a family it cannot handle yet: `where`, the model type, what is missing."""
    return UsageError(f"{where}: model type '{model_type(model_or_config)}': {what}")


def find(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The submodule at a dotted `path` ("" is `root` itself), None where a part is missing."""
    mod = root
    for part in filter(None, path.split(".")):
        mod = getattr(mod, part, None)
        if not isinstance(mod, torch.nn.Module):
            return None
    return mod


@dataclass(frozen=True)
class Layout:
    """Where one family keeps its parts. Paths are dotted attribute names: `blocks` and `final_norm` from the
    decoder (`get_decoder()`), the others from a block. `roles` maps a projection role to its module:

    - attention: `q`, `k`, `v` (or fused `qkv`), `o`;
    - MLP: `gate`, `up`, `down` (gated), `gate_up` fused with `down` (Phi-3), or `up`, `down` (two matrices);
    - MoE: `router` (a [experts, hidden] weight), `experts` (3-D parameters, one slice per expert), and the
      shared expert's `shared_gate`, `shared_up`, `shared_down`, `shared_router`.

    `conv1d`: the projections are GPT-2's `Conv1D` (a linear whose weight is stored [in, out]).
    `qkv_per_head`: a fused `qkv` holds [q, k, v] of one head after another (GPT-NeoX), not all q rows, then k,
    then v (Phi-3, GPT-2). `ffn_key`: the config key that sets the MLP's width (`ffn_dim` for OPT, `n_inner` for
    GPT-2). `head_dim_key`: the attention takes its head size from `config.head_dim` (not hidden / heads), so a
    config can describe fewer heads of the same size."""

    family: str
    blocks: str
    attention: str
    mlp: str | None  # None: the MLP's linears sit on the block itself (OPT)
    norms: tuple[str, str]
    final_norm: str
    roles: dict[str, str] = field(default_factory=dict)
    conv1d: bool = False
    qkv_per_head: bool = False
    ffn_key: str = "intermediate_size"
    head_dim_key: bool = True

    @property
    def moe(self) -> bool:
        return "experts" in self.roles

    @property
    def gated(self) -> bool:
        return "gate" in self.roles or "gate_up" in self.roles or "shared_gate" in self.roles

    def missing(self, block: torch.nn.Module) -> list[str]:
        """The parts of this layout that `block` lacks (empty: the block is of this family)."""
        paths = [self.attention, *self.norms, *self.roles.values()] + ([self.mlp] if self.mlp else [])
        return [p for p in paths if find(block, p) is None]
