"""The cost-model setting of a list of stages (search/cost.py's `Setting`): what each method's settings or plan
does to the model, in cost terms."""

from __future__ import annotations

import math

from adaflex.search.cost import Setting, Shape


def _target_dims(shape: Shape) -> dict[str, tuple[int, int]]:
    d, m, q, kv = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_heads * shape.head_dim,
        shape.num_kv_heads * shape.head_dim,
    )
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, m),
        "up_proj": (d, m),
        "down_proj": (m, d),
    }


def setting_of(
    stages: list[tuple[str, object, dict | None, dict]],
    shape: Shape,
    context: int,
    sparse_kernel: bool = False,
    model_bytes: float = 4.0,
) -> Setting:
    """The cost-model setting of stages in order: (method, config, plan or None, metrics). Without a plan the
    stage is predicted from its settings, spending its whole allowance (routes run `max_executed` blocks,
    a pruning that may drop blocks drops as many as its sparsity allows)."""
    from adaflex.retrofit.kv.config import KVConfig

    cur, removed, sparsity, pattern = shape.num_layers, 0, 0.0, "unstructured"
    executed, kv_frac, bpv, ad_params, ad_macs = None, 1.0, None, 0, 0
    for method, cfg, plan, metrics in stages:
        if method == "drop":
            k = len(plan["removed"]) if plan else cfg.count(cur)
        elif method == "prune":
            if plan:
                k = len(plan["removed"])
                kept = [e for e in plan["linears"] if not e.get("removed")]
                n = sum(math.prod(e["shape"]) for e in kept)
                sparsity = sum(e["sparsity"] * math.prod(e["shape"]) for e in kept) / max(1, n)
            else:
                s = (cfg.nm[1] - cfg.nm[0]) / cfg.nm[1] if cfg.nm and cfg.allocation == "uniform" else cfg.sparsity
                k = min(cur - 1, int(math.floor(s * cur + 1e-9))) if cfg.allow_drop else 0
                sparsity = 0.0 if cfg.allow_drop else s
            pattern = cfg.pattern
        elif method == "shards":
            dims = plan["shapes"] if plan else {t: _target_dims(shape)[t] for t in cfg.targets}
            per_rank = sum(a + b for a, b in dims.values())
            rank_params = cfg.equivalent_rank if cfg.method == "mos" else cfg.rank
            ad_params = plan["trainable_params"] if plan else rank_params * cur * per_rank
            ad_macs = cfg.rank * per_rank
            k = 0
        elif method == "routes":
            if plan and plan.get("policy") == "path":
                executed = float(len(plan["path"]))
            elif plan and metrics.get("calibrated_executed_mean") is not None:
                executed = float(metrics["calibrated_executed_mean"])
            else:
                executed = float(min(cfg.max_executed or cur, cur))
            k = 0
        elif method == "kv":
            assert isinstance(cfg, KVConfig)
            import torch

            from adaflex.retrofit.kv.cache import storage_bytes_per_value

            rel = storage_bytes_per_value(
                cfg.storage, {4.0: torch.float32, 2.0: torch.bfloat16}.get(model_bytes, torch.float32), shape.head_dim
            )
            byte_budget = cfg.budget if cfg.tokens is None else min(1.0, cfg.tokens / context) * rel
            kv_frac = min(1.0, byte_budget / rel)
            bpv = shape.bytes_per_value * rel
            k = 0
        else:
            raise ValueError(f"no cost rule for stage '{method}'")
        removed, cur = removed + k, cur - k
    if executed is not None:
        executed = min(executed, 2.0 * cur)
    return Setting(
        removed_blocks=removed,
        executed=executed,
        sparsity=sparsity,
        pattern="2:4" if pattern == "2:4" else pattern,
        sparse_kernel=sparse_kernel,
        kv_fraction=kv_frac,
        kv_bytes_per_value=bpv,
        adapter_params=int(ad_params),
        adapter_macs=int(ad_macs),
    )
