"""LLM-Streamline's light replacement: one low-rank map per run of removed blocks, h ↦ h + B·A·h.

B starts at zero, so the map is the identity (what removing the run does) and training moves it towards
what the run did. It hangs on the kept block before the run as `adaflex_heal_after` (a forward hook on
that block's output); a run at the very start hangs on block 0 as `adaflex_heal_before` (on its input).
Its parameters have "adaflex" in their names, so export keeps them out of model.safetensors."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..arch import decoder_layers
from ..prune.scores import block_linears
from ..state import state_of
from .plan import Run


class Replacement(nn.Module):
    def __init__(self, d: int, rank: int):
        super().__init__()
        self.adaflex_a = nn.Parameter(torch.empty(rank, d))
        self.adaflex_b = nn.Parameter(torch.zeros(d, rank))

    def reset(self, generator: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.adaflex_a.shape[1])
        with torch.no_grad():
            self.adaflex_a.copy_(torch.rand(self.adaflex_a.shape, generator=generator) * 2 * bound - bound)
            self.adaflex_b.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + (h @ self.adaflex_a.T.to(h.dtype)) @ self.adaflex_b.T.to(h.dtype)

    def macs(self) -> int:
        return self.adaflex_a.numel() + self.adaflex_b.numel()


def _after(block, _args, out):
    rep = block.adaflex_heal_after
    if isinstance(out, tuple):
        return (rep(out[0]), *out[1:])
    return rep(out)


def _before(block, args, kwargs):
    rep = block.adaflex_heal_before
    if args:
        return (rep(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": rep(kwargs["hidden_states"])}


def attach(model, runs: list[Run], rank: int) -> list[Replacement]:
    """Install one identity-initialised replacement per run (`after`: kept index or -1; heal/plan.py)."""
    layers, d = decoder_layers(model), model.config.hidden_size
    ref = next(model.parameters())
    out = []
    for run in runs:
        rep = Replacement(d, rank).to(ref.device)
        if run.after < 0:
            blk = layers[0]
            blk.adaflex_heal_before = rep
            blk.adaflex_heal_hook = blk.register_forward_pre_hook(_before, with_kwargs=True)
        else:
            blk = layers[run.after]
            blk.adaflex_heal_after = rep
            blk.adaflex_heal_hook = blk.register_forward_hook(_after)
        out.append(rep)
    if runs:
        state_of(model).patched("heal", _undo)  # a patch of the model (retrofit/state.py)
    return out


def _undo(model, _saved) -> None:
    detach_all(model)


def detach_all(model) -> None:
    for blk in decoder_layers(model):
        hook = blk.__dict__.pop("adaflex_heal_hook", None)
        if hook is not None:
            hook.remove()
        for name in ("adaflex_heal_after", "adaflex_heal_before"):
            if name in blk._modules:
                del blk._modules[name]
    state_of(model).unpatched("heal")


def _same(w: torch.Tensor, d: torch.Tensor) -> bool:
    """Block weights that only lost entries to pruning (zeros) are those of the dense block."""
    if w.shape != d.shape:
        return False
    keep = w != 0
    return bool(torch.equal(w[keep], d.to(w.dtype)[keep]))


@torch.no_grad()
def removed_runs(model, dense) -> list[dict] | None:
    """Where the dense model's blocks went: each run of removed dense blocks with the kept block it follows.
    Kept blocks are matched in order to the dense ones by their first linear; None when a block matches no
    dense block (e.g. width pruning reshaped it), so the runs cannot be located."""
    now, ref = decoder_layers(model), decoder_layers(dense)
    origin, j = [], 0
    for blk in now:
        w = block_linears(blk)[0][1].weight
        while j < len(ref) and not _same(w, block_linears(ref[j])[0][1].weight):
            j += 1
        if j == len(ref):
            return None
        origin.append(j)
        j += 1
    runs, prev = [], -1
    for pos, o in enumerate([*origin, len(ref)]):
        gap = list(range(prev + 1, o))
        if gap:
            runs.append({"after": pos - 1, "blocks": gap})
        prev = o
    return runs
