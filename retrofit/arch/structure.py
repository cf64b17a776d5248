"""Where a model keeps its parts: the decoder, its blocks, each block's attention, MLP, norms and projection
roles, the final norm. The family is recognised by the parts a block has (one `Layout` per family module), so
a Llama-style model of a type not listed here still works; a block that matches no layout is refused in one
line naming the model type and what its blocks lack."""

from __future__ import annotations

import torch

from .base import Layout, find, unknown
from .gemma import GEMMA
from .gpt2 import GPT2
from .llama import LLAMA, PHI3
from .moe import MIXTRAL, SHARED
from .neox import NEOX
from .opt import OPT

# most specific first: a Gemma block also matches Llama's parts, a shared-expert MoE block the plain MoE layout
LAYOUTS: tuple[Layout, ...] = (GEMMA, LLAMA, SHARED, MIXTRAL, PHI3, NEOX, OPT, GPT2)
BLOCK_LISTS = tuple(dict.fromkeys(lay.blocks for lay in LAYOUTS))  # "layers", "h"


def decoder(model) -> torch.nn.Module:
    get = getattr(model, "get_decoder", None)
    dec = get() if get is not None else None
    if not isinstance(dec, torch.nn.Module):
        raise unknown(model, "its decoder (no get_decoder())")
    return dec


def blocks_name(model) -> str:
    """The decoder's attribute that holds the block list (a stage that removes or reroutes blocks sets it)."""
    dec = decoder(model)
    for name in BLOCK_LISTS:
        if isinstance(getattr(dec, name, None), torch.nn.ModuleList):
            return name
    raise unknown(model, f"its decoder blocks (no {' or '.join(f'`{n}`' for n in BLOCK_LISTS)} list on "
                         f"{type(dec).__name__})")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks, in order (a stage that removes blocks replaces this list: `set_decoder_layers`)."""
    return getattr(decoder(model), blocks_name(model))


def set_decoder_layers(model, blocks: torch.nn.ModuleList) -> None:
    setattr(decoder(model), blocks_name(model), blocks)


def layout(model, block: torch.nn.Module | None = None) -> Layout:
    """The family layout of `model`'s blocks (the first block unless `block` is given)."""
    if block is None:
        blocks = decoder_layers(model)
        if not len(blocks):
            raise unknown(model, "a model without decoder blocks")
        block = blocks[0]
    for lay in LAYOUTS:
        if not lay.missing(block):
            return lay
    lacks = LLAMA.missing(block)
    more = f" and {len(lacks) - 3} more" if len(lacks) > 3 else ""
    raise unknown(model, f"its block layout ({type(block).__name__} matches no known family; as a Llama-style "
                         f"block it lacks {', '.join(lacks[:3])}{more})")


def _part(model, block, path: str, role: str) -> torch.nn.Module:
    mod = find(block, path)
    if mod is None:
        raise unknown(model, f"a block's {role} (no `{path}` on {type(block).__name__})")
    return mod


def attention(model, block) -> torch.nn.Module:
    return _part(model, block, layout(model, block).attention, "attention")


def mlp(model, block) -> torch.nn.Module:
    lay = layout(model, block)
    if lay.mlp is None:
        raise unknown(model, f"a block's MLP module ({lay.family} keeps its MLP linears on the block)")
    return _part(model, block, lay.mlp, "MLP")


def norms(model, block) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(norm before attention, norm before the MLP) of a block."""
    lay = layout(model, block)
    return (_part(model, block, lay.norms[0], "input norm"),
            _part(model, block, lay.norms[1], "post-attention norm"))


def roles(model, block) -> dict[str, torch.nn.Module]:
    """Projection role (`q`, `k`, `v`, `qkv`, `o`, `gate`, `up`, `gate_up`, `down`, `router`, `experts`,
    `shared_*`: see `Layout`) -> the block's module."""
    return {role: _part(model, block, path, role) for role, path in layout(model, block).roles.items()}


def role_names(model, block=None) -> dict[str, str]:
    """Projection role -> the module's path inside a block (what peft `target_modules` name)."""
    return dict(layout(model, block).roles)


def routers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The block's MoE routers (`router`, `shared_router` roles of its layout; none for a dense block): they
    choose experts, so sparsity does not count them and prune leaves them whole."""
    lay = next((lay for lay in LAYOUTS if not lay.missing(block)), None)
    names = ("router", "shared_router")
    return [find(block, lay.roles[r]) for r in names if r in lay.roles] if lay is not None else []


def final_norm(model) -> torch.nn.Module:
    dec = decoder(model)
    names = tuple(dict.fromkeys(lay.final_norm for lay in LAYOUTS))
    for name in names:
        mod = find(dec, name)
        if isinstance(mod, torch.nn.Module) and not isinstance(mod, torch.nn.ModuleList):
            return mod
    raise unknown(model, f"its final norm (none of {', '.join(names)} on {type(dec).__name__})")
