"""Importance of FFN channels and attention heads on calibration windows, which of them a width keeps, and
the optional least-squares refit of down_proj / o_proj on the kept channels.

Both scores read the inputs of the down projection (the FFN channels' activations) and of the attention output
projection `o` (the heads' attention outputs), captured once on the dense model (any family: arch roles):

- `activation` (Minitron): per channel, the L2 norm over the sequence of its activation, averaged over
  the batch; a head's is the same over its head_dim values together.
- `wanda` (|W|·‖x‖ per channel): ‖x_j‖ over all tokens times the norm of the output column it feeds,
  ‖W_down[:, j]‖ (for a head, ‖W_o[:, head]‖_F): a bound of what the channel adds to the block output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..arch import decoder_layers
from ..progress import progress
from .parts import Parts, head_columns, out_in
from .shapes import BlockWidth, Dims

__all__ = ["Stats", "collect", "head_columns", "keep_indices", "refit", "scores"]


@dataclass
class Stats:
    """Per block: activation sums of down_proj's and o_proj's inputs (and their Gram matrices for refit)."""

    act_mlp: list[torch.Tensor]  # [I] sum over windows of the L2 over the sequence
    act_head: list[torch.Tensor]  # [H]
    sq_mlp: list[torch.Tensor]  # [I] sum of squares over every token
    sq_head: list[torch.Tensor]  # [H]
    gram_mlp: list[torch.Tensor | None] = field(default_factory=list)  # [I, I]
    gram_attn: list[torch.Tensor | None] = field(default_factory=list)  # [H·hd, H·hd]
    windows: int = 0


@torch.no_grad()
def collect(model, windows: torch.Tensor, dims: Dims, parts: Parts, batch_size: int = 8, gram: bool = False) -> Stats:
    layers = decoder_layers(model)
    n = len(layers)
    inter, H, hd = dims.intermediate, dims.heads, dims.head_dim
    dev = model.device  # the sums meet the activations where the model runs
    z = lambda k: [torch.zeros(k, dtype=torch.float64, device=dev) for _ in range(n)]  # noqa: E731
    st = Stats(z(inter), z(H), z(inter), z(H))
    st.gram_mlp = [torch.zeros(inter, inter, dtype=torch.float64, device=dev) if gram else None for _ in range(n)]
    st.gram_attn = [torch.zeros(H * hd, H * hd, dtype=torch.float64, device=dev) if gram else None for _ in range(n)]

    def hook(b: int, kind: str):
        def fn(_mod, args):
            x = args[0].detach().double()  # [B, T, C]
            if kind == "mlp":
                st.act_mlp[b] += x.norm(dim=1).sum(0)
                st.sq_mlp[b] += x.pow(2).sum((0, 1))
                g = st.gram_mlp[b]
            else:
                xh = x.reshape(*x.shape[:2], H, hd)
                st.act_head[b] += xh.pow(2).sum((1, 3)).sqrt().sum(0)
                st.sq_head[b] += xh.pow(2).sum((0, 1, 3))
                g = st.gram_attn[b]
            if g is not None:
                flat = x.reshape(-1, x.shape[-1])
                g += flat.T @ flat

        return fn

    hooks = []
    for b, blk in enumerate(layers):
        hooks.append(parts.down(blk).register_forward_pre_hook(hook(b, "mlp")))
        hooks.append(parts.o(blk).register_forward_pre_hook(hook(b, "attn")))
    try:
        for s in progress(range(0, windows.shape[0], batch_size), desc="width: importance",
                          total=-(-windows.shape[0] // batch_size)):
            model.get_decoder()(input_ids=windows[s : s + batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    st.windows = windows.shape[0]
    return st


def scores(model, st: Stats, kind: str, dims: Dims, parts: Parts) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(FFN channel scores [I], head scores [H]) of every block; higher is kept first."""
    mlp, heads = [], []
    for b, blk in enumerate(decoder_layers(model)):
        if kind == "activation":
            mlp.append(st.act_mlp[b] / st.windows)
            heads.append(st.act_head[b] / st.windows)
        else:
            wd = out_in(parts.down(blk)).double()
            wo = out_in(parts.o(blk)).double().reshape(wd.shape[0], dims.heads, dims.head_dim)
            mlp.append(st.sq_mlp[b].sqrt() * wd.norm(dim=0))
            heads.append(st.sq_head[b].sqrt() * wo.pow(2).sum((0, 2)).sqrt())
    return mlp, heads


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in ascending index order (ties: the lower index wins)."""
    order = torch.argsort(-score, stable=True)[:k]
    return torch.sort(order).values


def keep_indices(mlp_score: torch.Tensor, head_score: torch.Tensor, dims: Dims, w: BlockWidth):
    """(FFN channels, query heads, KV groups) a block of width `w` keeps, each ascending.

    Groups are ranked by the sum of the scores of the heads they would keep, then each kept group keeps
    its `w.per_group` best heads; query heads stay grouped in the order of their KV groups."""
    channels = _top(mlp_score, w.channels)
    per = head_score.reshape(dims.kv_heads, dims.per_group)
    best = torch.sort(per, dim=1, descending=True, stable=True).values[:, : w.per_group].sum(1)
    groups = _top(best, w.kv_groups)
    heads = torch.cat([g * dims.per_group + _top(per[g], w.per_group) for g in groups.tolist()])
    return channels, heads, groups


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """W' minimising ‖W x − W' x_K‖² over the calibration inputs x (Gram G = Σ x xᵀ):
    W' = W G[:, K] (G[K, K] + λ I)⁻¹, with λ = damp × the mean diagonal of G[K, K]."""
    gkk = gram[keep][:, keep]
    lam = damp * float(gkk.diagonal().mean()) + 1e-12
    rhs = weight.double() @ gram[:, keep]  # [out, |K|]
    a = gkk + lam * torch.eye(len(keep), dtype=gkk.dtype, device=gkk.device)
    return torch.linalg.solve(a, rhs.T).T.to(weight.dtype)  # G[K,K] symmetric
