"""Cost model of a retrofitted decoder, relative to its dense model (pure: no torch, no model code).

What one generated token costs at a reference context of C tokens, counted in multiply-accumulates:

    dense  = L · (block + attn(C)) + head
    retro  = E · (block · width · (1 − counted sparsity) + adapter + attn(kv · C)) + head

with `block` the MACs of a block's linears (q, k, v, o, gate, up, down), `attn(n) = 2 · heads · head_dim · n`
(scores and weighted sum over n cached keys), `head` the LM head, `E` the block executions per token
(blocks kept after removal, or the mean a router executes, repeats counted twice) and `kv` the share of
the context each executed block keeps in its cache. Skipped blocks hold no KV entries (routes decide at
prefill and keep the decision), so the cache holds `E · kv · C` token-slots against the dense `L · C`.

Weight sparsity is reported, and counted as saved FLOPs only where a kernel exploits it. None does on
CPU: PyTorch runs an unstructured-sparse matrix as a dense one, so unstructured sparsity is reported,
never counted; a 2:4 pattern counts (each 2:4 linear at 0.5 of its MACs) only when `sparse_kernel` says
a semi-structured kernel runs it (GPU).

Budgets are fractions of the dense figures on named axes: `flops` (flops_ratio), `kv` (kv_ratio) and
`params` (adapter parameters over the dense model's parameters); a bare fraction is the FLOPs axis.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

AXES = {"flops": "flops_ratio", "kv": "kv_ratio", "params": "params_ratio"}


@dataclass(frozen=True)
class Shape:
    """The dense model's dimensions. From a config (`from_config`) it is a Llama-style decoder (GQA attention, gated
    MLP); measured from a model's modules (retrofit/arch/reference.py `search_shape`) it is any family's."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bytes_per_value: float = 4.0  # element size of the dense cache
    # MACs per token of a block's linears measured from the modules (retrofit/arch: MoE top-k, fused or two-matrix
    # projections, Conv1D); 0: the Llama formula below
    measured_block_macs: int = 0
    # (path in the block, d_in, d_out) of each adaptable linear (nn.Linear, Conv1D) of a block, measured from the
    # modules, and the family's projection roles (role, path): what an adapter's predicted cost counts (shards,
    # heal); () for a Shape from a config, whose adapters are Llama's projections
    linears: tuple[tuple[str, int, int], ...] = ()
    roles: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, cfg, bytes_per_value: float = 4.0) -> Shape:
        """From a Hugging Face config object or dict (LlamaConfig's key names)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        heads = get("num_attention_heads")
        return cls(
            num_layers=get("num_hidden_layers"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            vocab_size=get("vocab_size"),
            bytes_per_value=bytes_per_value,
        )

    @property
    def block_macs(self) -> int:
        if self.measured_block_macs:
            return self.measured_block_macs
        d, hd = self.hidden_size, self.head_dim
        return d * self.num_heads * hd * 2 + 2 * d * self.num_kv_heads * hd + 3 * d * self.intermediate_size

    @property
    def head_macs(self) -> int:
        return self.hidden_size * self.vocab_size

    def attention_macs(self, kv_len: float) -> float:
        return 2.0 * self.num_heads * self.head_dim * kv_len

    @property
    def kv_values_per_token(self) -> int:
        """Values one block caches per token (keys and values)."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def params(self) -> int:
        """Parameters of the dense model: the blocks' linears and the (tied) embedding."""
        return self.num_layers * self.block_macs + self.vocab_size * self.hidden_size


@dataclass(frozen=True)
class Setting:
    """What a configuration does to the model, in cost terms (defaults: the dense model)."""

    removed_blocks: int = 0
    executed: float | None = None  # block executions per token; None: every kept block once
    width: float = 1.0  # share of the block linears' MACs kept by structured (row/column) pruning
    sparsity: float = 0.0  # zeros among the kept blocks' linear weights
    pattern: str = "unstructured"  # or "2:4" (then `sparsity` is 0.5 × the share of 2:4 linears)
    sparse_kernel: bool = False  # a semi-structured kernel runs the 2:4 linears
    kv_fraction: float = 1.0  # share of the context each executed block keeps
    kv_bytes_per_value: float | None = None  # storage of the kept entries (int8: ~1); None: the dense size
    adapter_params: int = 0
    adapter_macs: int = 0  # per token per executed block (adapters not merged into the weights)


@dataclass(frozen=True)
class Cost:
    flops_ratio: float
    kv_ratio: float
    params_ratio: float
    sparsity: float  # reported
    counted_sparsity: float  # the part of it that saves FLOPs
    weights_ratio: float  # nonzero block-linear weights kept vs dense
    executed: float
    macs_per_token: float
    dense_macs_per_token: float
    kv_bytes: float  # the cache at the reference context
    adapter_params: int
    context: int

    def to_dict(self) -> dict:
        return asdict(self)

    def axis(self, name: str) -> float:
        return getattr(self, AXES[name])


def counted_sparsity(s: Setting) -> float:
    """Sparsity that saves FLOPs: only 2:4 under a kernel that exploits it (see the module docstring)."""
    return s.sparsity if (s.pattern == "2:4" and s.sparse_kernel) else 0.0


def cost(shape: Shape, s: Setting, context: int) -> Cost:
    """Per-token cost of `s` at a reference context of `context` tokens, relative to the dense model."""
    if not 0 <= s.removed_blocks < shape.num_layers:
        raise ValueError(f"removed_blocks {s.removed_blocks} not in 0..{shape.num_layers - 1}")
    if not (0 <= s.sparsity <= 1 and 0 < s.width <= 1 and 0 <= s.kv_fraction <= 1):
        raise ValueError("sparsity, width and kv_fraction are fractions")
    L, C = shape.num_layers, context
    executed = float(L - s.removed_blocks) if s.executed is None else float(s.executed)
    counted = counted_sparsity(s)
    dense = L * (shape.block_macs + shape.attention_macs(C)) + shape.head_macs
    per_block = shape.block_macs * s.width * (1 - counted) + s.adapter_macs + shape.attention_macs(s.kv_fraction * C)
    macs = executed * per_block + shape.head_macs
    bpv = shape.bytes_per_value if s.kv_bytes_per_value is None else s.kv_bytes_per_value
    kv_bytes = executed * s.kv_fraction * C * shape.kv_values_per_token * bpv
    dense_kv = L * C * shape.kv_values_per_token * shape.bytes_per_value
    kept = (L - s.removed_blocks) / L * s.width * (1 - s.sparsity)
    return Cost(
        flops_ratio=macs / dense,
        kv_ratio=kv_bytes / dense_kv,
        params_ratio=s.adapter_params / shape.params,
        sparsity=s.sparsity,
        counted_sparsity=counted,
        weights_ratio=kept,
        executed=executed,
        macs_per_token=macs,
        dense_macs_per_token=dense,
        kv_bytes=kv_bytes,
        adapter_params=s.adapter_params,
        context=C,
    )


# ---- budgets ----

_NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"


def parse_budget(spec: str) -> dict[str, float]:
    """`0.6` (FLOPs) or `flops=0.6,kv=0.25,params=0.02` -> {axis: fraction}; ValueError names what is wrong."""
    text = spec.strip()
    if re.fullmatch(_NUM, text):
        parts = [("flops", text)]
    else:
        parts = []
        for item in text.split(","):
            if "=" not in item:
                raise ValueError(f"'{item.strip()}' is neither a fraction nor AXIS=FRACTION")
            k, v = (x.strip() for x in item.split("=", 1))
            parts.append((k, v))
    out: dict[str, float] = {}
    for k, v in parts:
        if k not in AXES:
            raise ValueError(f"unknown axis '{k}' (one of: {', '.join(AXES)})")
        if k in out:
            raise ValueError(f"axis '{k}' given twice")
        if not re.fullmatch(_NUM, v):
            raise ValueError(f"{k}={v}: not a number")
        x = float(v)
        if not (x > 0 and math.isfinite(x)) or (k != "params" and x > 1):
            raise ValueError(f"{k}={v}: must lie in (0, 1]" if k != "params" else f"{k}={v}: must be > 0")
        out[k] = x
    if not out:
        raise ValueError("empty budget")
    return out


def format_budget(budget: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in budget.items())


def violations(c: Cost | dict, budget: dict[str, float]) -> list[float]:
    """Optuna-style constraint values, one per budget axis: cost − budget (≤ 0 is within the budget)."""
    get = (lambda a: c[AXES[a]]) if isinstance(c, dict) else c.axis
    return [get(a) - b for a, b in budget.items()]


def feasible(c: Cost | dict, budget: dict[str, float], tol: float = 1e-9) -> bool:
    return all(v <= tol for v in violations(c, budget))


def pareto_front(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the non-dominated points (every coordinate minimised), in input order."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front
