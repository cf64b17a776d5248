"""Fixed per-layer index vectors of MoS (drawn once, from a seed; the "routing" is static).

Pool of one side (A or B) of one projection type: n = e·L·l shards. The first (e−p)·L·l are public,
then layer i owns the private block of p·l shards starting at (e−p)·L·l + i·p·l. Each layer's index
vector [r, l]: r−p public rank vectors, then p private ones.

- subset selection: a layer draws its public shards without replacement (needs (r−p)·l ≤ public size)
- pair dissociation: A and B indices drawn independently (else B reuses A's indices)
- vector sharding: each of a vector's l shards drawn on its own (else a vector takes l consecutive shards)
- privatization: p > 0
"""

from __future__ import annotations

import torch

from .config import mos_feasibility


def pool_size(num_layers: int, equivalent_rank: int, n_sh: int) -> int:
    return equivalent_rank * num_layers * n_sh


def _side(g: torch.Generator, layer: int, num_layers: int, r: int, e: int, n_sh: int, p: int, subset: bool,
          shard: bool) -> torch.Tensor:
    public = (e - p) * num_layers * n_sh
    k = r - p
    if k:
        if shard:
            if subset:
                pick = torch.randperm(public, generator=g)[: k * n_sh]
            else:
                pick = torch.randint(public, (k * n_sh,), generator=g)
            pub = pick.view(k, n_sh)
        else:
            groups = public // n_sh
            pick = torch.randperm(groups, generator=g)[:k] if subset else torch.randint(groups, (k,), generator=g)
            pub = pick[:, None] * n_sh + torch.arange(n_sh)
    else:
        pub = torch.empty(0, n_sh, dtype=torch.long)
    start = public + layer * p * n_sh
    if shard:
        priv = start + torch.randperm(p * n_sh, generator=g).view(p, n_sh)
    else:
        priv = start + torch.arange(p * n_sh).view(p, n_sh)
    return torch.cat([pub, priv])


def draw(num_layers: int, r: int, e: int, n_sh: int, p: int = 0, *, subset: bool = True, dissociate: bool = True,
         shard: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Index vectors [L, r, n_sh] for A and for B (int64)."""
    why = mos_feasibility(r, e, n_sh, p, num_layers, subset)
    if why:
        raise ValueError(why)
    g = torch.Generator().manual_seed(seed)
    a = torch.stack([_side(g, i, num_layers, r, e, n_sh, p, subset, shard) for i in range(num_layers)])
    if not dissociate:
        return a, a.clone()
    b = torch.stack([_side(g, i, num_layers, r, e, n_sh, p, subset, shard) for i in range(num_layers)])
    return a, b
