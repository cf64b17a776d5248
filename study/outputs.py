"""What a study leaves in its output folder: trials.csv, pareto.png, best.yaml (and best-single.yaml), and
search.json, the summary that `adaflex search --format json` prints."""

from __future__ import annotations

import collections
import csv
import io as _io
import json
from pathlib import Path

import yaml

from adaflex.retrofit import io, registry
from adaflex.retrofit.recipe import validate
from adaflex.search.cost import AXES, format_budget, pareto_front

from .heal import best_healed
from .session import Session


def trial_rows(study, budget: dict) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        c = a.get("cost") or {}
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "worker": "{host}:{pid}".format(**a["worker"]) if "worker" in a else "",
                "stages": "+".join(m for m, _ in a.get("stages", [])) or "dense",
                "quality": a.get("quality"),
                "feasible": a.get("feasible"),
                **{AXES[x]: c.get(AXES[x]) for x in AXES},
                "sparsity": c.get("sparsity"),
                "executed": c.get("executed"),
                "cost_source": a.get("cost_source", ""),
                "reason": a.get("reason", ""),
                "params": json.dumps(t.params, sort_keys=True, default=str),
                "settings": a.get("stages", []),
                "retry_of": t.system_attrs.get("failed_trial"),
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = [k for k in rows[0] if k != "settings"] if rows else ["number"]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    io.write_text(path, buf.getvalue())


def plot(path: Path, rows: list[dict], dense_q: float | None, budget: dict, axis: str, front: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = AXES[axis]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get(key) is not None]
    for feas, color, label in ((False, "#bbbbbb", "over budget"), (True, "#4c72b0", "within budget")):
        pts = [r for r in done if bool(r["feasible"]) == feas and "+" in r["stages"]]
        if pts:
            ax.scatter([r[key] for r in pts], [r["quality"] for r in pts], c=color, s=22, label=f"composed, {label}")
    markers = "vsP^D<>hX*"  # one per method, in registry order
    for i, m in enumerate(registry.METHODS):
        mk = markers[i % len(markers)]
        pts = [r for r in done if r["stages"] == m]
        if pts:
            ax.scatter(
                [r[key] for r in pts],
                [r["quality"] for r in pts],
                marker=mk,
                s=60,
                edgecolors="black",
                label=f"{m} alone",
            )
    if front:
        fr = sorted(front, key=lambda r: r[key])
        ax.step(
            [r[key] for r in fr],
            [r["quality"] for r in fr],
            where="post",
            color="#dd8452",
            marker="o",
            markersize=10,
            markerfacecolor="none",
            label="Pareto front (within budget)",
        )
    if dense_q is not None:
        ax.scatter([1.0], [dense_q], marker="*", s=200, c="gold", edgecolors="black", label="dense", zorder=5)
    ax.axvline(budget[axis], color="red", ls="--", lw=1, label=f"budget {axis}={budget[axis]:g}")
    qs = [r["quality"] for r in done] + ([dense_q] if dense_q else [])
    if qs and max(qs) / max(min(qs), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(f"{key} (vs dense)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("adaflex search: quality vs cost")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with io.atomic_path(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def best_recipe(raw: dict, settings: list, budget: dict, header: str) -> str:
    rec = {k: v for k, v in raw.items() if k not in ("search", "stages", "budget")}
    out = {}
    for k in ("model", "seed", "data"):
        if k in rec:
            out[k] = rec.pop(k)
    out["budget"] = dict(budget)
    out["stages"] = [{m: s} for m, s in settings]
    out.update(rec)
    validate(out, "best.yaml")
    return header + yaml.safe_dump(out, sort_keys=False)


def finish(
    study, session: Session, budget: dict, pareto: bool, n_trials: int, name: str, label: str, out: Path,
    healed: dict | None = None,
) -> dict:
    """`healed` ({trial number: result}, study/heal.py): the best is then the best healed trial, with the heal
    stage in its settings and best.yaml."""
    rows = trial_rows(study, budget)
    for r in rows:
        r["healed_quality"] = (healed or {}).get(str(r["number"]), {}).get("quality")
    states = collections.Counter(r["state"] for r in rows)
    ok = [r for r in rows if r["state"] == "COMPLETE" and r["feasible"]]
    axes = list(budget)
    front_idx = pareto_front([(r["quality"], *[r[AXES[a]] for a in axes]) for r in ok])
    front = [ok[i] for i in front_idx]
    best = min(ok, key=lambda r: (r["quality"], r[AXES[axes[0]]])) if ok else None
    picked = best_healed(healed or {})
    if picked is not None:  # picked by healed quality, costed with the heal stage
        best = {**next(r for r in rows if r["number"] == picked[0]), "quality": picked[1]["quality"],
                **{AXES[a]: picked[1]["cost"][AXES[a]] for a in AXES}}
    dense_q = study.user_attrs.get("dense_quality")
    write_csv(out / "trials.csv", rows)
    plot(out / "pareto.png", rows, dense_q, budget, axes[0], front)
    summary = {
        "study": name,
        "storage": label,
        "out": str(out),
        "budget": budget,
        "pareto_mode": pareto,
        "quality_metric": "perplexity",
        "quality_protocol": {
            "context": session.context,
            "continuation": session.continuation,
            "windows": session.windows,
            "reference_context": session.ref_context,
        },
        "dense": {"quality": dense_q, **{AXES[a]: 1.0 for a in AXES}},
        "trials": {
            "requested": n_trials,
            "total": len(rows),
            "complete": states["COMPLETE"],
            "pruned": states["PRUNED"],
            "failed": states["FAIL"],
            "running": states["RUNNING"],
            "waiting": states["WAITING"],
            "feasible": len(ok),
            "this_worker": session.ran,
        },
        "pareto_front": [r["number"] for r in front],
        "best": None,
        "recipe": None,
        "best_single": None,
        "table": sorted(ok, key=lambda r: r["quality"])[:10],
    }
    if healed is not None:
        summary["healed"] = [{"trial": int(n), "unhealed": r["unhealed"], "healed": r.get("quality"),
                              "feasible": r.get("feasible"), "flops_ratio": (r.get("cost") or {}).get("flops_ratio"),
                              **({"reason": r["reason"]} if "reason" in r else {})} for n, r in healed.items()]
    if best is not None:
        t = study.trials[best["number"]]
        a = dict(t.user_attrs)
        if picked is not None:
            h = picked[1]
            a.update(stages=h["stages"], quality=h["quality"], cost=h["cost"], measured=h["measured"],
                     stage_metrics=[*a.get("stage_metrics", []), *h.get("stage_metrics", [])])
        summary["best"] = {
            "trial": t.number,
            "config": [{m: st} for m, st in a["stages"]],
            "stages": a["stages"],
            "params": t.params,
            "quality": {"metric": "perplexity", "value": a["quality"]},
            "cost": a["cost"],
            "flops_ratio": a["cost"]["flops_ratio"],
            "measured": a["measured"],
            "stage_metrics": a.get("stage_metrics", []),
            **({"unhealed": {"quality": t.user_attrs["quality"], "cost": t.user_attrs["cost"]}}
               if picked is not None else {}),
        }
        header = (
            f"# adaflex search: best of study {name} under budget {format_budget(budget)} (trial {t.number})\n"
            f"# quality (continuation perplexity, {session.windows} windows{', healed' if picked else ''}): "
            f"{a['quality']:.4g}; "
            f"flops_ratio {a['cost']['flops_ratio']:.4f}, kv_ratio {a['cost']['kv_ratio']:.4f}, "
            f"params_ratio {a['cost']['params_ratio']:.5f}\n"
        )
        io.write_text(out / "best.yaml", best_recipe(session.raw, a["stages"], budget, header))
        summary["recipe"] = str(out / "best.yaml")
        # the benchmark's reference: the best single-method trial at the same or lower cost on every axis
        single = [
            r
            for r in ok
            if "+" not in r["stages"]
            and r["stages"] != "dense"
            and all(r[AXES[x]] <= best[AXES[x]] + 1e-12 for x in axes)
        ]
        if single:
            s = min(single, key=lambda r: r["quality"])
            ts = study.trials[s["number"]]
            head = (
                f"# adaflex search: best single-method trial of study {name} at the cost of trial {t.number} or "
                f"lower (trial {ts.number}); quality {s['quality']:.4g}, flops_ratio {s['flops_ratio']:.4f}\n"
            )
            io.write_text(out / "best-single.yaml", best_recipe(session.raw, ts.user_attrs["stages"], budget, head))
            summary["best_single"] = {
                "trial": ts.number,
                "stages": ts.user_attrs["stages"],
                "quality": {"metric": "perplexity", "value": s["quality"]},
                "cost": ts.user_attrs["cost"],
                "recipe": str(out / "best-single.yaml"),
            }
    else:
        costed = [r for r in rows if r.get(AXES[axes[0]]) is not None]
        parts = []
        for ax_ in axes:
            key = AXES[ax_]
            cand = [r for r in costed if r.get(key) is not None]
            if cand:
                r = min(cand, key=lambda r: r[key])
                parts.append(
                    f"{key} {r[key]:.4f} (trial {r['number']}"
                    f"{', predicted' if r['cost_source'] == 'predicted' else ''})"
                )
        summary["infeasible"] = (
            f"--budget {format_budget(budget)}: no configuration met it in {len(rows)} trials; "
            f"cheapest found: {', '.join(parts) or 'none costed'}"
        )
    io.write_json(out / "search.json", summary)
    return summary
