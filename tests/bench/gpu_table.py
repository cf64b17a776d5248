"""gpu_e2e.py's markdown: one table of systems (speed against its ideal, memory, quality against the CPU), one of
shard-LoRA against peft, one of healing throughput."""

from __future__ import annotations


def _f(v, fmt: str = "{:.2f}") -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt.format(v)
    if isinstance(v, str):  # an error or a skip: its first words
        return v.split(":")[0]
    return "–"


def _x(row: dict, got: str, ideal: str) -> str:
    a, b = row.get(got), row.get(ideal)
    return f"{_f(a)} / {_f(b)}" if a is not None else "–"


def markdown(data: dict) -> str:
    a = data["args"]
    dt = a["dtype"]
    cs, bs = a["contexts"], a["batches"]
    head = (["model", "system"] + [f"prefill {c} tok/s" for c in cs] + [f"decode b{b} tok/s" for b in bs]
            + [f"prefill {c} ×dense / ideal" for c in cs] + [f"decode b{b} ×dense / ideal" for b in bs]
            + ["peak GiB", "weights GiB", f"ppl {dt}", "ppl fp32", "CPU ppl", "fp32 vs CPU", f"{dt} vs CPU"])
    lines = [f"{data.get('gpu', 'device ' + a['device'])}, torch {data.get('torch')}, {dt}, {data['mode']}; "
             f"decode after {a['decode_context']} tokens, {a['decode_steps']} steps, best of {a['repeats']}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["rows"]:
        peaks = [r.get(k) for k in r if k.endswith("_peak_gib") and isinstance(r.get(k), float)]
        built = r.get("built")
        cells = [r["model"], r["system"] if built is True or built is None else f"{r['system']} ({_f(built)})"]
        cells += [_f(r.get(f"prefill_{c}_tok_s"), "{:,.0f}") for c in cs]
        cells += [_f(r[f"decode_b{b}"].get("tok_s"), "{:,.0f}") if isinstance(r.get(f"decode_b{b}"), dict)
                  else _f(r.get(f"decode_b{b}")) for b in bs]
        cells += [_x(r, f"prefill_{c}_x", "ideal_prefill_x") for c in cs]
        cells += [_x(r, f"decode_b{b}_x", f"ideal_decode_b{b}_x") for b in bs]
        cells += [_f(max(peaks)) if peaks else "–", _f(r.get("weight_gib"), "{:.3f}"), _f(r.get(f"ppl_{dt}")),
                  _f(r.get("ppl_fp32")), _f(r.get("cpu_ppl")), _f(r.get("ppl_fp32_vs_cpu"), "{:+.2%}"),
                  _f(r.get(f"ppl_{dt}_vs_cpu"), "{:+.2%}")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if data.get("lora"):
        lines += ["", "| projection | tokens | merged µs | peft LoRA µs | shard-LoRA µs | shard / peft |",
                  "|---|---|---|---|---|---|"]
        for r in data["lora"]:
            u = r.get("us")
            if not isinstance(u, dict):
                lines.append(f"| {r['d_in']}→{r['d_out']} | {r['tokens']} | {_f(u)} | | | |")
                continue
            kinds = ("eager", "graph") if u.get("merged_graph_us") is not None else ("eager",)
            cell = {k: " / ".join(_f(u[f"{k}_{kind}_us"], "{:.1f}") for kind in kinds)
                    for k in ("merged", "peft_lora", "shard_lora")}
            ratio = " / ".join(_f(u[f"shard_over_peft_{kind}"]) for kind in kinds)
            lines.append(f"| {r['d_in']}→{r['d_out']} | {r['tokens']} | {cell['merged']} | {cell['peft_lora']} | "
                         f"{cell['shard_lora']} | {ratio} |")
        lines.append("(eager / CUDA-graph replay where both)")
    for r in data.get("heal", []):
        h = r.get("heal")
        lines += ["", f"heal step, {r['model']} {r['system']}: " + (
            f"{_f(h['train_tokens_per_s'], '{:,.0f}')} training tokens/s ({h['steps']} steps of {h['batch']} × "
            f"{h['seq_len']}, {h['dtype']})" if isinstance(h, dict) else _f(h))]
    return "\n".join(lines) + "\n"
