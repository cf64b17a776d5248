"""Dr.LLM supervision: Monte-Carlo tree search over layer execution paths.

A node is a whole execution path: the tuple of block indices run in order. The root is the dense
path (0, 1, ..., L-1). From a path the actions are

    delete 1 position, delete 2 consecutive positions, repeat one block once (copy right after it)

so every path stays in block order and every block runs 0, 1 or 2 times (its per-block label).
Paths never exceed `max_len` executions (2L by default) and are never empty; actions that give back
the same path (no-ops) or a path already listed are dropped.

One simulation: descend from the root while the node is fully expanded, picking with probability
epsilon a random child, else the child maximising

    R/n + c * sqrt(ln N_parent / n) - lam * len(path) / L          (unvisited: +inf)

then expand one untried action of the (already visited) node reached, evaluate the new path with
the reward callable, and back the reward up to the root. Rewards are cached per path.

Three bugs of the released code are fixed on purpose:
  * every node keeps `num_layers` = L, so the length penalty is normalised by the real depth;
  * the exploration term uses the visits of the child's parent, not the global simulation count;
  * no "repeat 0 times" (or any other) no-op children.

Budget: `max_executed` bounds the label, not the tree. Paths executing more than `max_executed`
blocks are still explored (the dense root itself may be over budget and the short paths lie below
it) and back up their true reward, but they never become labels nor trigger the early stop.

The caller usually evaluates a path by running its blocks on cached hidden states; consecutive
paths share prefixes. `prefix_reuse` counts block evaluations with and without reusing them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Node",
    "PathSearch",
    "PrefixReuse",
    "block_counts",
    "child_paths",
    "common_prefix_len",
    "enrich",
    "prefix_reuse",
    "search_path",
    "select_child",
    "ucb",
]

Path = tuple[int, ...]


def child_paths(path: Sequence[int], num_layers: int, max_len: int | None = None) -> list[Path]:
    """All distinct paths one action away from `path`, in a fixed order (deletes, pairs, repeats)."""
    path = tuple(path)
    max_len = 2 * num_layers if max_len is None else max_len
    m = len(path)
    out: list[Path] = []
    for i in range(m):  # delete one position
        out.append(path[:i] + path[i + 1 :])
    for i in range(m - 1):  # delete two consecutive positions
        out.append(path[:i] + path[i + 2 :])
    if m < max_len:
        for i, b in enumerate(path):  # repeat a block that runs once: insert its copy right after it
            if path.count(b) == 1:
                out.append(path[: i + 1] + (b,) + path[i + 1 :])
    seen = {path}  # the parent itself would be a no-op child
    uniq = []
    for p in out:
        if p and p not in seen:
            seen.add(p)
            uniq.append(p)
    return uniq


@dataclass(eq=False)
class Node:
    """A search-tree node: one execution path with its visit statistics."""

    path: Path
    num_layers: int  # kept by every child (bug fix: the released code lost it below the root)
    parent: Node | None = None
    max_len: int | None = None
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0  # summed reward
    _untried: list[Path] | None = None

    @property
    def untried(self) -> list[Path]:
        """Child paths not expanded yet (computed on first use)."""
        if self._untried is None:
            self._untried = child_paths(self.path, self.num_layers, self.max_len)
        return self._untried

    def add_child(self, path: Path) -> Node:
        child = Node(path, self.num_layers, parent=self, max_len=self.max_len)
        self.children.append(child)
        return child


def ucb(child: Node, c: float = 1.8, lam: float = 3.0) -> float:
    """Selection score of `child`: mean reward + exploration (parent's visits) - length penalty."""
    if child.visits == 0:
        return math.inf
    parent_visits = child.parent.visits if child.parent is not None else child.visits
    explore = c * math.sqrt(math.log(max(parent_visits, 1)) / child.visits)
    return child.value / child.visits + explore - lam * len(child.path) / child.num_layers


def select_child(
    node: Node, rng: random.Random, c: float = 1.8, lam: float = 3.0, epsilon: float = 0.1
) -> Node:
    """Epsilon-random child, else the UCB argmax (first child on ties)."""
    if rng.random() < epsilon:
        return rng.choice(node.children)
    return max(node.children, key=lambda ch: ucb(ch, c, lam))


def block_counts(path: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Per-block label: how many times each block runs (0 skip, 1 execute, 2 repeat)."""
    counts = [0] * num_layers
    for b in path:
        counts[b] += 1
    return tuple(counts)


@dataclass(frozen=True)
class PathSearch:
    """Outcome of one example's search."""

    label: Path | None  # shortest correct path within budget, None if there is none
    counts: tuple[int, ...] | None  # per-block runs of the label
    label_reward: float | None
    dense_reward: float
    dense_correct: bool
    best_reward: float  # highest reward among evaluated paths within budget (dense if none)
    fixed: bool  # dense was wrong and a correct path was found
    simulations: int
    evaluations: int  # distinct reward calls
    stopped_early: bool
    evaluated: tuple[Path, ...]  # paths in the order they were first evaluated (for prefix_reuse)

    @property
    def saved_blocks(self) -> int | None:
        """Blocks executed less than dense by the label (negative if it repeats more than skips)."""
        return None if self.label is None else len(self.dense_path) - len(self.label)

    @property
    def dense_path(self) -> Path:
        return self.evaluated[0]


def search_path(
    reward: Callable[[Path], float],
    num_layers: int,
    *,
    simulations: int = 50,
    c: float = 1.8,
    lam: float = 3.0,
    epsilon: float = 0.1,
    success: float = 0.5,
    max_executed: int | None = None,
    max_len: int | None = None,
    min_saving: int = 2,
    early_stop: bool = True,
    seed: int = 0,
    prior: Sequence[float] | None = None,
    widening: float | None = None,
) -> PathSearch:
    """Search execution paths of an L-block model for one example.

    Args:
        reward: path -> score; 1.0/0.0 for correct/wrong, or any real score. Called once per path.
        num_layers: L, the dense depth.
        simulations: MCTS iterations (50 in the paper, 200 in the authors' code).
        c, lam, epsilon: exploration constant, length penalty, random-child probability.
        success: a path is *correct* when its reward >= success.
        max_executed: a label may execute at most this many blocks (default: no limit but max_len).
        max_len: cap on executions of any path in the tree (default 2L).
        min_saving: early stop once a correct path is at least this many blocks shorter than dense.
        early_stop: stop when a correct path fixes a dense error or saves `min_saving` blocks.
        seed: seeds `random.Random`, the only source of randomness.
        prior: a cost per block (e.g. ShortGPT block influence: low = removable). Expansion then takes the
            untried child that saves the most blocks at the least summed cost of the blocks it removes
            (repeats last) instead of a random one: with ~3L children per node and tens of simulations, a
            random order leaves the labels one arbitrary action from dense.
        widening: progressive widening: a node with n visits counts as fully expanded once it has
            ceil(widening * sqrt(n)) children, so few simulations still reach paths several actions deep.
            None: a node is expanded until no action is left (Dr.LLM).
    """
    L = num_layers
    if L < 1:
        raise ValueError("num_layers must be >= 1")
    max_len = 2 * L if max_len is None else max_len
    if max_len < L:
        raise ValueError(f"max_len {max_len} < num_layers {L}: the dense root would be out of the tree")
    limit = max_len if max_executed is None else min(max_executed, max_len)
    if prior is not None and len(prior) != L:
        raise ValueError(f"prior has {len(prior)} entries for {L} blocks")
    rng = random.Random(seed)

    cache: dict[Path, float] = {}
    order: list[Path] = []

    def evaluate(path: Path) -> float:
        if path not in cache:
            cache[path] = float(reward(path))
            order.append(path)
        return cache[path]

    def backup(node: Node | None, r: float) -> None:
        while node is not None:
            node.visits += 1
            node.value += r
            node = node.parent

    dense = tuple(range(L))
    root = Node(dense, L, max_len=max_len)
    dense_r = evaluate(dense)
    backup(root, dense_r)
    dense_ok = dense_r >= success

    def stops(path: Path, r: float) -> bool:
        if r < success or len(path) > limit:
            return False
        return not dense_ok or len(path) <= L - min_saving

    def expanded(node: Node) -> bool:
        if not node.untried:
            return True
        return widening is not None and len(node.children) >= math.ceil(widening * math.sqrt(node.visits))

    def pick(node: Node) -> int:
        if prior is None:
            return rng.randrange(len(node.untried))
        have = block_counts(node.path, L)

        def key(i: int):
            child = node.untried[i]
            diff = [h - n for h, n in zip(have, block_counts(child, L), strict=True)]
            cost = sum(prior[b] * abs(d) for b, d in enumerate(diff) if d)
            return (-sum(diff), cost, i)

        return min(range(len(node.untried)), key=key)

    sims, stopped = 0, False
    while sims < simulations and not stopped:
        sims += 1
        node = root
        while node.children and expanded(node):  # selection through fully expanded nodes
            node = select_child(node, rng, c, lam, epsilon)
        if node.untried:  # expansion: one untried action of this visited node (random, or by the prior)
            node = node.add_child(node.untried.pop(pick(node)))
        r = evaluate(node.path)  # a terminal node is re-scored from the cache
        backup(node, r)
        stopped = early_stop and stops(node.path, r)

    # label: shortest correct path within budget; ties -> fewer distinct blocks, higher reward
    valid = [p for p in order if len(p) <= limit]
    correct = [p for p in valid if cache[p] >= success]
    label = min(correct, key=lambda p: (len(p), len(set(p)), -cache[p], p)) if correct else None
    return PathSearch(
        label=label,
        counts=block_counts(label, L) if label is not None else None,
        label_reward=cache[label] if label is not None else None,
        dense_reward=dense_r,
        dense_correct=dense_ok,
        best_reward=max((cache[p] for p in valid), default=dense_r),
        fixed=(not dense_ok) and label is not None,
        simulations=sims,
        evaluations=len(cache),
        stopped_early=stopped,
        evaluated=tuple(order),
    )


def common_prefix_len(path_a: Sequence[int], path_b: Sequence[int]) -> int:
    """Number of leading positions two paths share (hidden states reusable up to there)."""
    n = 0
    for a, b in zip(path_a, path_b):
        if a != b:
            break
        n += 1
    return n


@dataclass(frozen=True)
class PrefixReuse:
    """Block evaluations needed to score a list of paths, without and with prefix reuse."""

    naive: int  # sum of len(path): every path run from the embeddings
    computed: int  # block evaluations actually needed with reuse

    @property
    def saved(self) -> int:
        return self.naive - self.computed

    @property
    def ratio(self) -> float:
        """Share of block evaluations saved (0 when there is nothing to run)."""
        return self.saved / self.naive if self.naive else 0.0


def prefix_reuse(paths: Iterable[Sequence[int]], mode: str = "trie") -> PrefixReuse:
    """Count block evaluations of `paths` (in evaluation order) with hidden-state reuse.

    mode "trie": the caller keeps the state after every prefix it has computed, so each distinct
        prefix costs one block evaluation once (computed = number of trie nodes).
    mode "last": the caller keeps only the previous path's states, so path i costs
        len(path_i) - common_prefix_len(path_i, path_{i-1}).
    """
    naive = computed = 0
    if mode == "trie":
        trie: dict = {}
        for p in paths:
            naive += len(p)
            node = trie
            for b in p:
                if b not in node:
                    node[b] = {}
                    computed += 1
                node = node[b]
    elif mode == "last":
        prev: Sequence[int] = ()
        for p in paths:
            naive += len(p)
            computed += len(p) - common_prefix_len(p, prev)
            prev = p
    else:
        raise ValueError(f"mode must be 'trie' or 'last', got {mode!r}")
    return PrefixReuse(naive=naive, computed=computed)


def enrich(examples: Sequence, min_fix_share: float = 0.3, seed: int = 0) -> list:
    """Select training examples: drop those without a label, keep >= min_fix_share routing fixes.

    Records are `PathSearch` results or anything with `label` and `fixed` (attributes or keys).
    All fixes are kept; other examples are subsampled at random (seeded) only when needed to reach
    the share. With no fix at all and a positive share, nothing can be kept: returns []. The kept
    records come back in their original order.
    """
    if not 0.0 <= min_fix_share <= 1.0:
        raise ValueError(f"min_fix_share must lie in [0, 1], got {min_fix_share}")
    valid = [e for e in examples if _get(e, "label") is not None]
    fixes = [i for i, e in enumerate(valid) if _get(e, "fixed")]
    others = [i for i, e in enumerate(valid) if not _get(e, "fixed")]
    if min_fix_share == 0.0:
        return valid
    # fixes / (fixes + kept_others) >= share  <=>  kept_others <= fixes * (1 - share) / share
    room = math.floor(len(fixes) * (1.0 - min_fix_share) / min_fix_share + 1e-9)
    if len(others) > room:
        others = random.Random(seed).sample(others, room)
    keep = sorted(fixes + others)
    return [valid[i] for i in keep]


def _get(record, key: str):
    return record[key] if isinstance(record, Mapping) else getattr(record, key)
