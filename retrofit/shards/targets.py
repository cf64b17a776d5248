"""Which linears of a block an adapter's targets name, from paths alone (no torch: the search's cost rule uses it
with the linears its `Shape` measured, the stage with the model's own).

A target names a block's linear as peft's `target_modules` does: its path or any dotted suffix of it, and it must
name exactly one. Left unset on a block without Llama's names, the targets are the family's projection roles
(retrofit/arch), each by its leaf name, or by its path where the leaf names two linears (GPT-2's `c_proj`)."""

from __future__ import annotations

NOT_ADAPTED = ("router", "experts", "shared_router")  # routers choose experts; 3-D experts are no linear


def matches(paths, target: str) -> list[str]:
    """The paths a target names: the path itself or any dotted suffix of it."""
    return [p for p in paths if p == target or p.endswith(f".{target}")]


def resolve(paths, roles: dict[str, str], targets, explicit: bool) -> list[str]:
    """The targets as set (`explicit`, or each naming one of `paths`), else the family's roles that adapt."""
    if explicit or all(len(matches(paths, t)) == 1 for t in targets):
        return list(targets)
    role_paths = [p for r, p in roles.items() if r not in NOT_ADAPTED]
    return [p.rsplit(".", 1)[-1] if len(matches(paths, p.rsplit(".", 1)[-1])) == 1 else p for p in role_paths]


def target_dims(shape) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each adaptable linear of a Llama-style block of a `Shape` built from a config (no measured
    linears: search/cost.py `Shape.from_config`)."""
    d, m = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}


def predicted_dims(shape, config, where: str = "shards") -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each target an adapter of `config` (an AdapterConfig) would get, before any plan: from the
    linears the `Shape` measured on the model (retrofit/arch/reference.py `search_shape`), resolved as the stage
    resolves them; a `Shape` from a config knows Llama's projections only."""
    from ..errors import UsageError

    if not shape.linears:
        dims = target_dims(shape)
        other = [t for t in config.targets if t not in dims]
        if other:
            raise UsageError(f"{where}.targets: the predicted cost (a search/cost.py Shape from a config) knows "
                             f"Llama's projections, not '{other[0]}'; run the recipe to measure it")
        return {t: dims[t] for t in config.targets}
    linears = {p: (d_in, d_out) for p, d_in, d_out in shape.linears}
    out = {}
    for t in resolve(linears, dict(shape.roles), config.targets, "targets" in config.model_fields_set):
        found = matches(linears, t)
        if t.split(".")[0] == "experts":  # a per-expert LoRA's cost needs the experts' count and top-k: measured
            raise UsageError(f"{where}.targets: the predicted cost does not count adapters on the 3-D experts "
                             f"('{t}'); run the recipe to measure it")
        if len(found) != 1:
            have = sorted({p.rsplit(".", 1)[-1] for p in linears})
            raise UsageError(f"{where}.targets: '{t}' names {len(found)} linears of a decoder block, not one (its "
                             f"blocks' linears: {', '.join(have) or 'none'})")
        out[t] = linears[found[0]]
    return out
