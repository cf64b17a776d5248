"""Execution by path for any Llama-style transformers model, without editing its modeling file.

`install(model, policy)` wraps the decoder's `forward` (on the instance). During a call the decoder's
`layers` list is swapped for the blocks themselves where every row runs a block once, nothing where no row
runs it, and a step elsewhere; step b

  * decides, at prefill only, how many times each row runs block b (0, 1 or 2) from the hidden states
    entering it (routers, a fixed path, or a random baseline), and
  * runs the block only on the rows that take it: all rows directly, a subset gathered with
    `kernels.gather_rows` and written back with `kernels.scatter_add_rows` (the block's residual delta).

Decisions are taken once per sequence, at prefill, and stored on the cache (`cache.adaflex_routes`,
LongTensor [B, L] of run counts): every later call with that cache (decoding, the continuation pass of
multiple-choice scoring, `generate()`) reuses them row by row. A block's first run uses cache slot b, its
repeat uses slot L + b, so both runs keep their own keys and values. Each slot holds only the rows that
run it; the cache's length queries, batch repetition and row selection are patched on the instance so
they stay right when some slots are empty. Without a cache every call decides from its own input.
"""

from __future__ import annotations

import itertools
import random
import types
from contextlib import contextmanager

import torch
from torch import nn

from adaflex.kernels.routes import gather_rows, scatter_add_rows

from .. import arch
from ..errors import UsageError
from ..state import state_of
from .router import EXECUTE, Routers, window_weights


def path_counts(path, num_layers: int, where: str = "path") -> tuple[int, ...]:
    """Per-block run counts of an execution path (block indices in order); bad paths are UsageErrors."""
    path = [int(b) for b in path]
    if not path:
        raise UsageError(f"{where}: a path executes at least one block")
    bad = [b for b in path if not 0 <= b < num_layers]
    if bad:
        raise UsageError(f"{where}: block {bad[0]} out of range 0..{num_layers - 1}")
    if any(b < a for a, b in itertools.pairwise(path)):
        raise UsageError(f"{where}: blocks must come in order (a repeat follows its block)")
    counts = [0] * num_layers
    for b in path:
        counts[b] += 1
    if max(counts) > 2:
        raise UsageError(f"{where}: a block runs at most twice")
    return tuple(counts)


def counts_path(counts) -> tuple[int, ...]:
    return tuple(b for b, c in enumerate(counts) for _ in range(int(c)))


# ---- policies: who decides at prefill ----


class RouterPolicy:
    """Trained routers on windowed mean-pooled prompt states."""

    def __init__(self, routers: Routers, windows: int = 8, dial: float = 0.0):
        self.routers, self.windows, self.dial = routers, windows, dial
        # a block whose labels only ever executed it has one allowed class: no router to run (most blocks)
        allowed = routers.allowed.cpu()
        self.constant = [int(allowed[b].nonzero()[0]) if int(allowed[b].sum()) == 1 else None
                         for b in range(allowed.shape[0])]
        self.guard_block = routers.first_routed() if routers.guarded else None

    def constant_count(self, b: int) -> int | None:
        return self.constant[b]

    def prepare(self, valid: torch.Tensor):
        weights, wmask = window_weights(valid, self.windows)
        wnorm = (wmask.float() / wmask.float().sum(1, keepdim=True).clamp_min(1))[:, None]  # [B, 1, W]
        return weights, wnorm, {}

    def decide(self, b: int, h: torch.Tensor, prep) -> torch.Tensor | int:
        if self.constant[b] is not None:
            return self.constant[b]
        weights, wnorm, moved = prep
        if h.device not in moved:  # once per pass, not per block
            moved[h.device] = (weights.to(h.device, h.dtype), wnorm.to(h.device))
        w, wn = moved[h.device]
        pooled = torch.bmm(w, h)
        c = self.routers.choose(b, pooled, wn, self.dial)
        if b == self.guard_block:  # decided once per prompt, where the routers first have a choice
            moved["outside"] = self.routers.outside(torch.bmm(wn.to(h.dtype), pooled)[:, 0])
        outside = moved.get("outside")
        if outside is not None and bool(outside.any()):  # out of domain: every block runs
            c = torch.where(outside, EXECUTE, c)
        return c


class FixedPolicy:
    """The same counts for every row (a static path); `rows` gives one path per row instead."""

    def __init__(self, counts=None, rows=None):
        self.counts, self.rows = counts, rows

    def prepare(self, valid):
        return valid.shape[0]

    def constant_count(self, b: int) -> int | None:
        return None if self.rows is not None else int(self.counts[b])

    def decide(self, b, h, B):
        if self.rows is not None:
            if len(self.rows) != B:
                raise UsageError(f"routes: {len(self.rows)} paths given for a batch of {B} rows")
            return torch.tensor([r[b] for r in self.rows], device=h.device)
        return torch.full((B,), self.counts[b], dtype=torch.long, device=h.device)


class RandomPolicy:
    """Random skipping at a budget: each row skips `skip` blocks (a float: rounded at random) drawn uniformly
    among `candidates` (default all), from a seeded generator."""

    def __init__(self, num_layers: int, skip: float, seed: int = 0, candidates=None):
        self.L, self.skip, self.rng = num_layers, skip, random.Random(seed)
        self.candidates = list(candidates) if candidates is not None else list(range(num_layers))
        self._rows = None

    def prepare(self, valid):
        B = valid.shape[0]
        rows = []
        for _ in range(B):
            k = int(self.skip) + (self.rng.random() < self.skip - int(self.skip))
            drop = set(self.rng.sample(self.candidates, min(k, len(self.candidates), self.L - 1)))
            rows.append([0 if b in drop else 1 for b in range(self.L)])
        return rows

    def constant_count(self, b: int) -> None:
        return None

    def decide(self, b, h, rows):
        return torch.tensor([r[b] for r in rows], device=h.device)


# ---- the cache side ----


def _slot_rows(routes: torch.Tensor, slot: int, L: int) -> torch.Tensor:
    b, rep = (slot, 0) if slot < L else (slot - L, 1)
    return (routes[:, b] > rep).nonzero().flatten()


def _attach(cache, L: int) -> None:
    """Prepare a cache for routed use: 2L slots, length queries over all slots, route-aware batch ops."""
    if getattr(cache, "adaflex_num_layers", None) == L:
        return
    cache.adaflex_num_layers = L
    cache.adaflex_routes = None
    layers = getattr(cache, "layers", None)
    if layers and len(layers) < 2 * L:
        add_slot = getattr(cache, "add_slot", None)  # a cache with per-layer budgets builds its own slots
        # templates from the layers as they are now: copying an appended slot would copy copies
        templates = {b: layers[b - L] if b >= L else layers[-1] for b in range(len(layers), 2 * L)}
        for b, src in templates.items():
            if add_slot is not None and b >= L:
                add_slot(b - L)
                continue
            try:
                new = type(src)(**({"sliding_window": src.sliding_window} if hasattr(src, "sliding_window") else {}))
            except TypeError:
                import copy

                new = copy.deepcopy(src)
            layers.append(new)

    def seq_len(self, layer_idx: int = 0) -> int:
        return max((lay.get_seq_length() for lay in self.layers if hasattr(lay, "get_seq_length")), default=0)

    def mask_sizes(self, query_length: int, layer_idx: int = 0):
        # a sliding layer holds window − 1 past tokens, as transformers' DynamicSlidingWindowLayer says
        past = self.get_seq_length()
        window = getattr(self.layers[layer_idx], "sliding_window", None) if layer_idx < len(self.layers) else None
        if window and past >= window:
            return window - 1 + query_length, past - window + 1
        return past + query_length, 0

    base_repeat = cache.batch_repeat_interleave
    base_select = cache.batch_select_indices

    def repeat(self, repeats: int):
        base_repeat(repeats)
        if self.adaflex_routes is not None:
            self.adaflex_routes = self.adaflex_routes.repeat_interleave(repeats, 0)

    def select(self, indices: torch.Tensor):
        routes = self.adaflex_routes
        if routes is None:
            return base_select(indices)
        indices = torch.as_tensor(indices, device=routes.device).long()
        for s, lay in enumerate(self.layers[: 2 * L]):
            rows = _slot_rows(routes, s, L)
            pos = torch.full((routes.shape[0],), -1, dtype=torch.long, device=routes.device)
            pos[rows] = torch.arange(len(rows), device=routes.device)
            keep = pos[indices]
            keep = keep[keep >= 0]
            if getattr(lay, "is_initialized", False):  # the layer's own select: a budgeted one also has masks, scores
                lay.batch_select_indices(keep)
        self.adaflex_routes = routes[indices]

    cache.get_seq_length = types.MethodType(seq_len, cache)
    cache.get_mask_sizes = types.MethodType(mask_sizes, cache)
    cache.batch_repeat_interleave = types.MethodType(repeat, cache)
    cache.batch_select_indices = types.MethodType(select, cache)
    cache.reorder_cache = types.MethodType(select, cache)


# ---- one forward pass ----


class _Pass:
    def __init__(self, L: int, B: int, routes: torch.Tensor | None, prep, policy):
        self.L, self.B, self.policy, self.prep = L, B, policy, prep
        self.fixed = routes is not None
        # run counts stay on the CPU, whatever the model's device: prefill reads them back (`tolist`, row lists)
        self.routes = routes if routes is not None else torch.ones(B, L, dtype=torch.long, device="cpu")
        self.owned = False
        self._layers: nn.ModuleList | None = None
        self._rows: dict[int, object] = {}  # slot -> row group, classified when a step first asks (rows())

    def _classify(self, rows: torch.Tensor):
        if rows.numel() == 0:
            return None
        if rows.numel() == self.B:
            return "all"
        return rows

    def decided(self, b: int, counts: list[int]) -> None:
        """Row groups of block b's two slots from its fresh decisions (a list per row), without a nonzero
        per slot (prefill pays these per block)."""
        for rep in (0, 1):
            take = [r for r, n in enumerate(counts) if n > rep]
            self._rows[b + rep * self.L] = (None if not take else "all" if len(take) == self.B
                                            else torch.tensor(take, device=self.routes.device))

    def layers(self, rt: RoutedRuntime) -> nn.ModuleList:
        """What the decoder loop runs: a block every row runs once is the block itself and one no row runs
        is left out, so the per-block wrapper is paid only where rows differ, a router decides or a block
        repeats (decoding a single sequence then runs the same modules as a statically cut model)."""
        if self._layers is None:
            if self.fixed:
                lo, hi = self.routes.min(0).values.tolist(), self.routes.max(0).values.tolist()
                uniform = [a if a == z else None for a, z in zip(lo, hi, strict=True)]
            else:
                uniform = [self.policy.constant_count(b) for b in range(self.L)]
            out = []
            for b, c in enumerate(uniform):
                if c == 1:
                    out.append(rt.blocks[b])
                elif c == 0 and self.fixed:
                    continue
                elif c == 0 and b < self.L - 1:  # decided now; the last block's step keeps a path non-empty
                    self.routes[:, b] = 0
                else:
                    out.append(rt.steps[b])
            self._layers = nn.ModuleList(out)
        return self._layers

    def rows(self, slot: int):
        if slot not in self._rows:
            self._rows[slot] = self._classify(_slot_rows(self.routes, slot, self.L))
        return self._rows[slot]


def _take(x, rows, B):
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B and B > 1:
        return gather_rows(x, rows) if x.dim() >= 2 else x.index_select(0, rows.to(x.device))
    if isinstance(x, tuple):
        return tuple(_take(t, rows, B) for t in x)
    return x


class _Step(nn.Module):
    """Stands for block b inside the decoder loop during a routed call."""

    def __init__(self, runtime: RoutedRuntime, b: int):
        super().__init__()
        object.__setattr__(self, "_runtime", runtime)  # not a submodule: no state-dict keys
        self.b = b
        self.attention_type = getattr(runtime.blocks[b], "attention_type", "full_attention")

    def forward(self, hidden_states, *args, **kwargs):
        rt, b = self._runtime, self.b
        P: _Pass = rt.current
        h = hidden_states
        if not P.fixed:
            c = P.policy.decide(b, h, P.prep)
            if isinstance(c, int) and c >= 1:  # the same for every row (a path stays non-empty)
                P.routes[:, b] = c
                P.decided(b, [c] * P.B)
            else:
                c = torch.as_tensor(c, device=P.routes.device).long().expand(P.B)
                if b == P.L - 1:  # never an empty path
                    c = torch.where(P.routes[:, :b].sum(1) == 0, c.clamp_min(1), c)
                P.routes[:, b] = c
                P.decided(b, c.tolist())
        block = rt.blocks[b]
        for rep in (0, 1):
            rows = P.rows(b + rep * P.L)
            if rows is None:
                continue
            attn = arch.attention(rt.model, block)
            old = attn.layer_idx
            attn.layer_idx = b + rep * P.L  # the repeat keeps its own cache slot
            try:
                if isinstance(rows, str):
                    out = block(h, *args, **kwargs)
                    h = out[0] if isinstance(out, tuple) else out
                    P.owned = True
                else:
                    sub = gather_rows(h, rows)
                    kw = {k: (v if k in ("cache", "past_key_values") else _take(v, rows, P.B))
                          for k, v in kwargs.items()}
                    out = block(sub, *[_take(a, rows, P.B) for a in args], **kw)
                    out = out[0] if isinstance(out, tuple) else out
                    if not P.owned or torch.is_grad_enabled():
                        h = h.clone()
                        P.owned = True
                    scatter_add_rows(h, rows, out - sub)
            finally:
                attn.layer_idx = old
        return h


class RoutedRuntime:
    """The routed decoder: `policy` decides at prefill; `routers` (if any) is attached as `adaflex_router`."""

    def __init__(self, model, policy, routers: Routers | None = None):
        self.model = model
        self.decoder = model.get_decoder()
        self.blocks = arch.decoder_layers(model)
        self.blocks_name = arch.blocks_name(model)
        self.L = len(self.blocks)
        self.policy = policy
        self.current: _Pass | None = None
        self.last_routes: torch.Tensor | None = None
        self.steps = nn.ModuleList(_Step(self, b) for b in range(self.L))
        self._orig_forward = self.decoder.forward
        self._forced = None
        self.decided_rows = self.decided_blocks = 0  # running figures of the decisions taken
        if routers is not None:
            self.decoder.adaflex_router = routers

    def forward(self, *args, **kwargs):
        dec = self.decoder
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        B, q = (ids.shape[0], ids.shape[1]) if ids is not None else (emb.shape[0], emb.shape[1])
        key = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(dec.config, "use_cache", True)
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=dec.config)
            kwargs[key] = cache
        routes = None
        if cache is not None:
            _attach(cache, self.L)
            routes = cache.adaflex_routes
            if routes is None and cache.get_seq_length() > 0:
                raise UsageError("routes: this cache was filled without routes; start from an empty cache")
            if routes is not None and routes.shape[0] != B:
                raise UsageError(f"routes: the cache holds routes for {routes.shape[0]} rows, the input has {B}")
        prep = None
        policy = self._forced or self.policy
        if routes is None:
            mask = kwargs.get("attention_mask")
            valid = torch.ones(B, q, dtype=torch.bool, device="cpu")  # policies prepare on the CPU
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                valid = mask[:, -q:].bool().cpu()
            prep = policy.prepare(valid)
        plan = getattr(cache, "adaflex_rowplan", None) if routes is not None else None
        if plan is not None and plan[0] is routes:  # decoding: the row groups of this cache's routes, once
            self.current = plan[1]
        else:
            self.current = _Pass(self.L, B, routes, prep, policy)
            if routes is not None:
                cache.adaflex_rowplan = (routes, self.current)
        self.current.owned = False  # the input of this call is not ours to write in place
        setattr(dec, self.blocks_name, self.current.layers(self))
        try:
            out = self._orig_forward(*args, **kwargs)
        finally:
            setattr(dec, self.blocks_name, self.blocks)
        self.last_routes = self.current.routes
        if routes is None:  # a prefill (or a cache-free call) decided: count its executed blocks
            self.decided_rows += B
            self.decided_blocks += int(self.current.routes.sum())
        if cache is not None and routes is None:
            cache.adaflex_routes = self.current.routes
        self.current = None
        return out


def install(model, policy, routers: Routers | None = None) -> RoutedRuntime:
    """Route `model` (in place); a second install replaces the first."""
    uninstall(model)
    rt = RoutedRuntime(model, policy, routers)
    rt.decoder.forward = rt.forward  # instance attribute: the class (and its modeling file) are untouched
    st = state_of(model)
    st.routes = rt
    st.patched("routes", _undo)
    return rt


def uninstall(model) -> None:
    st = state_of(model)
    rt = st.routes
    if rt is None:
        return
    dec = rt.decoder
    if "forward" in dec.__dict__:
        del dec.forward
    if "adaflex_router" in dec._modules:
        del dec._modules["adaflex_router"]
    st.routes = None
    st.unpatched("routes")


def _undo(model, _saved) -> None:
    uninstall(model)


def runtime_of(model) -> RoutedRuntime | None:
    return state_of(model).routes


@contextmanager
def forced_paths(model, paths):
    """Run with one given path per row (tests, oracles), whatever the installed policy."""
    rt = runtime_of(model) or install(model, FixedPolicy(counts=(1,) * len(arch.decoder_layers(model))))
    L = rt.L
    rt._forced = FixedPolicy(rows=[path_counts(p, L) for p in paths])
    try:
        yield rt
    finally:
        rt._forced = None
