"""Layer-sequential calibration (Wanda/SparseGPT style) that works for any decoder-layer signature.

Nothing about a decoder layer's arguments is hard-coded. A forward pre-hook on block 0 that raises
captures the hidden states entering the stack and the arguments the decoder passes with them; then one
cheap *recording* call, with every block's `forward` swapped for a recorder that passes its input
through, captures the arguments the decoder gives each block (they may differ per block: sliding-window
and full-attention layers get different masks in Qwen2, Gemma and others). From then on each block is
called directly with its own recorded arguments and the current hidden states, block after block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import decoder_layers
from ..progress import progress
from .experts import ExpertSlice, experts_modules, no_tokens, stats_hook
from .scores import Transposed, block_linears, keep_mask, score_of


class _Stop(Exception):
    """Raised by the capture hook to stop the forward at block 0."""


@dataclass
class Captured:
    """Calibration windows as the decoder stack sees them.

    `hidden[i]` is the input of block 0 for batch i; `calls[i][b]` the (args, kwargs) the decoder gives
    block b for batch i, with the hidden states taken out (`as_kw[i][b]`: they came as `hidden_states=`).
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]
    as_kw: list[list[bool]]
    tuple_out: bool = False
    tokens: int = 0
    sizes: list[int] = field(default_factory=list)

    def call(self, b: int, block, i: int, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.calls[i][b]
        out = block(**kwargs, hidden_states=x) if self.as_kw[i][b] else block(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict, bool]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    kw = dict(kwargs)
    return kw.pop("hidden_states"), (), kw, True


def _decoder_call(model, ids: torch.Tensor) -> None:
    model.get_decoder()(input_ids=ids, use_cache=False)


@torch.no_grad()
def capture(model, windows: torch.Tensor, batch_size: int = 8) -> Captured:
    layers = decoder_layers(model)
    cap = Captured([], [], [])
    first: list[tuple] = []

    def stop(_mod, args, kwargs):
        first.append((args, kwargs))
        raise _Stop

    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s : s + batch_size]
        first.clear()
        h = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            _decoder_call(model, ids)
        except _Stop:
            pass
        finally:
            h.remove()
        if not first:
            raise RuntimeError("the decoder never called its first block")
        hidden, args, kwargs, as_kw = _split(*first[0])
        if not cap.hidden:  # learn what a block returns (a tensor, or a tuple led by the hidden states)
            probe = layers[0](**kwargs, hidden_states=hidden) if as_kw else layers[0](hidden, *args, **kwargs)
            cap.tuple_out = isinstance(probe, tuple)
        calls, kws = _record_calls(model, ids, cap.tuple_out)
        cap.hidden.append(hidden)
        cap.calls.append(calls)
        cap.as_kw.append(kws)
        cap.sizes.append(ids.shape[0])
        cap.tokens += ids.numel()
    return cap


def _record_calls(model, ids, tuple_out: bool):
    """One decoder call with each block replaced by a pass-through recorder of its arguments."""
    layers = decoder_layers(model)
    calls: list = [None] * len(layers)
    kws: list = [False] * len(layers)

    def recorder(b):
        def forward(*args, **kwargs):
            hidden, rest, kw, as_kw = _split(args, kwargs)
            calls[b], kws[b] = (rest, kw), as_kw
            return (hidden,) if tuple_out else hidden

        return forward

    for b, blk in enumerate(layers):
        blk.forward = recorder(b)
    try:
        _decoder_call(model, ids)
    finally:
        for blk in layers:
            del blk.forward  # back to the class's forward
    missing = [b for b, c in enumerate(calls) if c is None]
    if missing:
        raise RuntimeError(f"the decoder skipped blocks {missing} while recording their arguments")
    return calls, kws


@torch.no_grad()
def run_block(cap: Captured, b: int, block, xs: list[torch.Tensor], stats: dict | None = None,
              names: list[str] | None = None, outputs: bool = True) -> list[torch.Tensor] | None:
    """Run block b on every batch; optionally accumulate Σx² per input feature of the named linears."""
    hooks = []
    if stats is not None:
        mods = dict(block_linears(block))
        names = names if names is not None else list(mods)
        experts = {n for n in names if isinstance(mods[n], ExpertSlice)}
        for ename, emod in experts_modules(block):  # per-expert statistics: one hook sees the routing
            mine = {n for n in experts if mods[n].module is emod}
            if mine:
                hooks.append(emod.register_forward_hook(stats_hook(emod, ename, mine, stats), with_kwargs=True))
        for name in (n for n in names if n not in experts):
            def acc(_mod, args, _out, name=name):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()  # the last dimension is the input, for Conv1D too
                sq = (x * x).sum(0)
                stats[name] = stats[name] + sq if name in stats else sq

            mod = mods[name]
            hooks.append((mod.module if isinstance(mod, Transposed) else mod).register_forward_hook(acc))
    try:
        out = [cap.call(b, block, i, x) for i, x in enumerate(xs)]
    finally:
        for h in hooks:
            h.remove()
    if stats is not None:
        no_tokens(stats, experts)
    return out if outputs else None


@torch.no_grad()
def dense_statistics(model, cap: Captured, desc: str = "prune: dense statistics") -> list[dict[str, torch.Tensor]]:
    """Σx² per input feature of every block linear, on the dense model (OWL's outlier ratios, DP curves)."""
    layers = decoder_layers(model)
    xs = list(cap.hidden)
    stats = []
    for b in progress(range(len(layers)), desc=desc, total=len(layers)):
        st: dict = {}
        xs = run_block(cap, b, layers[b], xs, stats=st, outputs=b < len(layers) - 1) or xs
        stats.append(st)
    return stats


@torch.no_grad()
def prune_sequential(model, cap: Captured | None, targets: list[dict[str, float]], score: str,
                     nm: tuple[int, int] | None, row: bool, dropped: set[int] = frozenset(),
                     desc: str = "prune: blocks") -> dict[tuple[int, str], torch.Tensor]:
    """Prune block after block: statistics of each block's inputs (with the earlier blocks already pruned),
    masks, zeroing, then the pruned block's outputs feed the next block. `targets[b][name]` is the sparsity
    of each linear; dropped blocks are skipped (their input passes through). Returns the keep masks."""
    layers = decoder_layers(model)
    need_data = score == "wanda"
    if need_data and cap is None:
        raise ValueError("wanda scores need calibration data")
    xs = list(cap.hidden) if need_data else []
    masks = {}
    last = max((b for b in range(len(layers)) if b not in dropped), default=-1)
    for b in progress(range(len(layers)), desc=desc, total=len(layers)):
        if b in dropped:
            continue
        block = layers[b]
        mods = dict(block_linears(block))
        active = [n for n in mods if targets[b].get(n, 0.0) > 0]
        stats: dict = {}
        if need_data and active:
            run_block(cap, b, block, xs, stats=stats, names=active, outputs=False)
        for name in active:
            w = mods[name].weight
            keep = keep_mask(score_of(w, score, stats.get(name)), targets[b][name], nm, row)
            w.masked_fill_(~keep, 0)
            masks[(b, name)] = keep
        if need_data and b < last:
            xs = run_block(cap, b, block, xs)
    return masks
