"""Per-question choosers of a skip set: from a prompt's states entering the first candidate block, pick the set
of blocks to skip (or repeat) for that question. The arithmetic of tests/bench/routes_choosers.py, which scores
ARC-Easy under every candidate path and reports how far such a choice goes (README, routes).

A scored split `rec` holds per question: `lp` [paths][choices] choice log-likelihoods (path 0 is dense), `label`,
and the prompt's `mean` and `last` token states.
"""

from __future__ import annotations

import torch

from .runtime import counts_path


def block_args(blocks: str, repeat: str, drop: str) -> tuple[list[int], tuple[int, ...], tuple[int, ...]]:
    """(candidates, repeat, drop) from `lo-hi` or comma lists; ValueError names the block given twice."""
    try:
        if "-" in blocks:
            lo, hi = (int(x) for x in blocks.split("-"))
            cand = list(range(lo, hi + 1))
        else:
            cand = sorted({int(x) for x in blocks.split(",")})
        rep, dro = (tuple(sorted({int(x) for x in v.split(",") if x.strip()})) for v in (repeat, drop))
    except ValueError:
        raise ValueError(f"--blocks {blocks!r} / --repeat {repeat!r} / --drop {drop!r}: expected lo-hi or comma "
                         "lists of block indices") from None
    both = sorted(set(dro) & set(rep) or set(cand) & set(dro + rep))
    if both:  # one block cannot be skipped and run twice, nor be a candidate and fixed on every path
        raise ValueError(f"--blocks {blocks} / --repeat {repeat} / --drop {drop}: block {both[0]} named twice")
    return cand, rep, dro


def path_of(L: int, moved: tuple, move: str, repeat: tuple = (), drop: tuple = ()) -> tuple:
    """The executed blocks in order: `moved` skipped (move "skip") or run twice ("repeat"); on every path but
    dense (no moved blocks) `repeat` runs twice as well and `drop` is skipped."""
    skip = (set(moved) if move == "skip" else set()) | (set(drop) if moved else set())
    twice = (set(moved) if move == "repeat" else set()) | (set(repeat) if moved else set())
    return counts_path([0 if b in skip else 1 + (b in twice) for b in range(L)])


def tables(rec) -> tuple[torch.Tensor, torch.Tensor]:
    """lead [N, S]: correct choice's log-likelihood minus the best other one; pick [N, S]: argmax choice."""
    n, S = len(rec["lp"]), len(rec["lp"][0])
    lead, pick = torch.zeros(n, S), torch.zeros(n, S, dtype=torch.long)
    for i, (lps, y) in enumerate(zip(rec["lp"], rec["label"], strict=True)):
        lp = torch.tensor(lps)  # [S, choices]
        lead[i] = lp[:, y] - torch.cat([lp[:, :y], lp[:, y + 1:]], 1).max(1).values
        pick[i] = lp.argmax(1)
    return lead, pick


def target(name: str, lead, pick) -> torch.Tensor:
    """Regression target per skip set (column 0 is dense and is not a choice)."""
    if name == "lead":
        return (lead[:, 1:] - lead[:, :1]).clamp(-10, 10)
    if name == "correct":
        return (lead[:, 1:] > 0).float()
    return (pick[:, 1:] == pick[:, :1]).float()


def features(rec, name: str) -> torch.Tensor:
    return torch.cat([torch.stack(rec[k]) for k in name.split("+")], 1)


def fit(X, Y, chooser: tuple[str, float]):
    """predict(X) [N, S] from standardised features: ridge (strength p, unpenalised intercept), or the mean
    target of the p nearest training questions by cosine similarity."""
    kind, p = chooser
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    if kind == "knn":
        Z = torch.nn.functional.normalize(Z, dim=1)
        return lambda Xn: Y[(torch.nn.functional.normalize((Xn - mu) / sd, dim=1) @ Z.T).topk(
            min(int(p), len(Z)), dim=1).indices].mean(1)
    ym = Y.mean(0)
    W = torch.linalg.solve(Z.T @ Z + p * torch.eye(Z.shape[1]), Z.T @ (Y - ym))
    return lambda Xn: ((Xn - mu) / sd) @ W + ym


def acc(lead: torch.Tensor, s: int) -> float:
    """Accuracy of skip set (column) s."""
    return (lead[:, s] > 0).float().mean().item()


def chosen_acc(pred: torch.Tensor, lead: torch.Tensor) -> float:
    """Accuracy when each question runs the skip set with the highest prediction."""
    choice = 1 + pred.argmax(1)
    return (lead[torch.arange(len(lead)), choice] > 0).float().mean().item()


def cv_acc(X, Y, lead, chooser, folds: int = 5) -> float:
    fold = torch.arange(len(X)) % folds
    right = 0.0
    for f in range(folds):
        tr, te = fold != f, fold == f
        right += chosen_acc(fit(X[tr], Y[tr], chooser)(X[te]), lead[te]) * int(te.sum())
    return right / len(X)
