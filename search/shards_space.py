"""Configuration search for shard adapters (MoS) under a parameter budget, as an Optuna study.

Pure: the caller gives the model's shapes and an objective callable (for adaflex, the held-out
calibration loss after a short training run); nothing here touches a model.

A configuration: rank r, equivalent_rank e, shards_per_vector l, private_rank p, targets. Its
trainable parameters are e·L·Σ_targets(d_in + d_out) (a rank-e LoRA's); it is valid when l divides
every targeted dim, p ≤ e ≤ r, a public pool remains for r − p vectors (p < e or p = r) and, drawn
without replacement, (r − p)·l ≤ (e − p)·L·l.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from itertools import product

from .errors import InfeasibleBudget

__all__ = ["ShardsSpace", "feasibility", "params", "search_shards", "valid_configs"]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ShardsSpace:
    num_layers: int
    shapes: Mapping[str, tuple[int, int]]  # projection type -> (d_in, d_out)
    ranks: Sequence[int] = (4, 8, 16, 32)
    equivalent_ranks: Sequence[int] = (1, 2, 4)
    shards_per_vector: Sequence[int] | None = None  # default: divisors of the dims' gcd, up to 16
    private_ranks: Sequence[int] = (0, 1)
    target_sets: Sequence[tuple[str, ...]] = field(default_factory=lambda: (ATTENTION + MLP, ATTENTION, MLP))
    subset_selection: bool = True

    def l_choices(self) -> list[int]:
        if self.shards_per_vector is not None:
            return list(self.shards_per_vector)
        g = reduce(math.gcd, [d for pair in self.shapes.values() for d in pair])
        return [k for k in range(1, min(g, 16) + 1) if g % k == 0]


def params(config: Mapping, space: ShardsSpace) -> int:
    dims = sum(sum(space.shapes[t]) for t in config["targets"])
    return config["equivalent_rank"] * space.num_layers * dims


def feasibility(config: Mapping, space: ShardsSpace) -> str | None:
    """Why a configuration cannot be built, or None."""
    r, e, n_sh, p = config["rank"], config["equivalent_rank"], config["shards_per_vector"], config["private_rank"]
    missing = [t for t in config["targets"] if t not in space.shapes]
    if missing:
        return f"unknown target {missing[0]}"
    bad = [t for t in config["targets"] if space.shapes[t][0] % n_sh or space.shapes[t][1] % n_sh]
    if bad:
        return f"shards_per_vector {n_sh} does not divide the dims of {bad[0]}"
    if e > r:
        return f"equivalent_rank {e} > rank {r}"
    if p > e or p > r:
        return f"private_rank {p} exceeds equivalent_rank or rank"
    if p == e and r > p:
        return "no public pool for the public rank vectors"
    if space.subset_selection and (r - p) * n_sh > (e - p) * space.num_layers * n_sh:
        return "more public shards per layer than the pool holds without replacement"
    return None


def valid_configs(space: ShardsSpace, budget_params: int | None = None) -> list[dict]:
    out = []
    for r, e, n_sh, p, ts in product(space.ranks, space.equivalent_ranks, space.l_choices(), space.private_ranks,
                                  space.target_sets):
        c = {"rank": r, "equivalent_rank": e, "shards_per_vector": n_sh, "private_rank": p, "targets": list(ts)}
        if feasibility(c, space) is None and (budget_params is None or params(c, space) <= budget_params):
            out.append(c)
    return out


def search_shards(objective: Callable[[dict], float], space: ShardsSpace, budget_params: int, *, trials: int = 20,
                  seed: int = 0, storage: str | None = None, study_name: str | None = None) -> dict:
    """Minimise `objective(config)` over valid configurations with at most `budget_params` parameters.

    Invalid or over-budget suggestions are pruned without calling the objective (they do not count
    toward `trials`). Returns the best configuration with its loss and parameters, and trial counts.
    Raises InfeasibleBudget when no configuration of the space fits the budget.
    """
    import optuna

    ok = valid_configs(space, budget_params)
    if not ok:
        cheapest = min((params(c, space) for c in valid_configs(space)), default=math.inf)
        raise InfeasibleBudget(f"no shard configuration has at most {budget_params} parameters "
                               f"(the smallest valid one has {cheapest})", cheapest, budget_params)
    labels = {"+".join(ts): list(ts) for ts in space.target_sets}
    seen: dict[str, float] = {}

    def trial_fn(trial: optuna.Trial) -> float:
        c = {"rank": trial.suggest_categorical("rank", list(space.ranks)),
             "equivalent_rank": trial.suggest_categorical("equivalent_rank", list(space.equivalent_ranks)),
             "shards_per_vector": trial.suggest_categorical("shards_per_vector", space.l_choices()),
             "private_rank": trial.suggest_categorical("private_rank", list(space.private_ranks)),
             "targets": labels[trial.suggest_categorical("targets", list(labels))]}
        c = repair(c, space, budget_params)
        if c is None:
            raise optuna.TrialPruned("no valid configuration near this suggestion fits the budget")
        key = repr(sorted(c.items()))
        trial.set_user_attr("config", c)
        trial.set_user_attr("params", params(c, space))
        if key not in seen:  # a repaired suggestion may repeat an earlier one: train it once
            seen[key] = float(objective(c))
        return seen[key]

    def enough(study: optuna.Study, _t) -> None:
        if len(seen) >= min(trials, len(ok)) or len(study.trials) >= 5 * trials:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                storage=storage, study_name=study_name, load_if_exists=storage is not None)
    study.optimize(trial_fn, callbacks=[enough])
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:  # every suggestion was pruned: evaluate a valid one directly
        c = ok[0]
        return {"best": {**c, "loss": float(objective(c)), "params": params(c, space)},
                "trials": {"complete": 1, "evaluated": 1, "pruned": len(study.trials)}}
    best = min(done, key=lambda t: t.value)
    return {"best": {**best.user_attrs["config"], "loss": best.value, "params": best.user_attrs["params"]},
            "trials": {"complete": len(done), "evaluated": len(seen), "pruned": len(study.trials) - len(done)}}


def repair(config: Mapping, space: ShardsSpace, budget_params: int) -> dict | None:
    """The nearest valid configuration within budget: l down to one that divides the targeted dims, e down
    to the budget, r up to e, p down below e; None if the targets cannot fit at all."""
    c = dict(config)
    dims = [d for t in c["targets"] for d in space.shapes.get(t, (0, 0))]
    ls = [k for k in sorted(space.l_choices()) if k <= c["shards_per_vector"] and all(d % k == 0 for d in dims)]
    if not ls:
        return None
    c["shards_per_vector"] = ls[-1]
    es = [e for e in sorted(space.equivalent_ranks) if e <= c["equivalent_rank"]
          and params({**c, "equivalent_rank": e}, space) <= budget_params]
    if not es:
        es = [e for e in sorted(space.equivalent_ranks) if params({**c, "equivalent_rank": e}, space) <= budget_params]
    if not es:
        return None
    c["equivalent_rank"] = es[-1]
    for r in [c["rank"]] + sorted(space.ranks):
        for p in sorted({q for q in space.private_ranks if q <= c["private_rank"]} | {0}, reverse=True):
            cand = {**c, "rank": r, "private_rank": p}
            if feasibility(cand, space) is None:
                return cand
    return None
