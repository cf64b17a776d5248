"""Readers for calibration and evaluation data (README.md, Commands), with seeded calibration windows.

Layouts: plain text, JSONL with `text`, and the multiple-choice layouts of ARC, PIQA and HellaSwag.
A file in the wrong layout is a UsageError naming the file, line and key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

MC_LAYOUTS = ("arc", "piqa", "hellaswag")


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]  # continuations, each with its leading space
    label: int


def jsonl_records(path: Path) -> list[tuple[int, dict]]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise UsageError(f"{path}:{n}: not valid JSON (expected one JSON object per line)") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    if not out:
        raise UsageError(f"{path}: no records")
    return out


def detect_layout(path: str | Path) -> str:
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        return "text"
    n, first = jsonl_records(path)[0]
    return layout_of(path, n, first)


def layout_of(source, n: int, first: dict) -> str:
    """The layout of a record (the first of a JSONL file or a dataset), by its keys."""
    if "question" in first and "choices" in first:
        return "arc"
    if "goal" in first and "sol1" in first:
        return "piqa"
    if "endings" in first:
        return "hellaswag"
    if "text" in first:
        return "jsonl"
    raise UsageError(
        f"{source}:{n}: unknown layout (keys {sorted(first)}); expected 'text' or an ARC, PIQA or HellaSwag record"
    )


def read_text(path: str | Path, layout: str = "auto") -> str:
    """Plain text of a file; for multiple-choice data, each question with its correct answer."""
    path = Path(path)
    layout = detect_layout(path) if layout == "auto" else layout
    if layout == "text":
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read ({e})") from None
    if layout in MC_LAYOUTS:
        return "\n\n".join(it.context + it.choices[it.label] for it in read_mc(path, layout))
    return record_texts(path, jsonl_records(path))


def _get(path: Path, n: int, rec: dict, dotted: str, kind: type | tuple):
    node = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UsageError(f"{path}:{n}: key '{dotted}' missing")
        node = node[part]
    if not isinstance(node, kind):
        raise UsageError(f"{path}:{n}: key '{dotted}' has the wrong type ({type(node).__name__})")
    return node


def _arc(path: Path, n: int, rec: dict) -> MCItem:
    q = _get(path, n, rec, "question", str)
    texts = _get(path, n, rec, "choices.text", list)
    labels = [str(x) for x in _get(path, n, rec, "choices.label", list)]
    key = str(_get(path, n, rec, "answerKey", (str, int)))
    if len(texts) != len(labels) or len(texts) < 2:
        raise UsageError(f"{path}:{n}: key 'choices' needs as many labels as texts (at least 2)")
    if key not in labels:
        raise UsageError(f"{path}:{n}: key 'answerKey' {key!r} is not among the labels {labels}")
    return MCItem(f"Question: {q}\nAnswer:", tuple(f" {t}" for t in texts), labels.index(key))


def _piqa(path: Path, n: int, rec: dict) -> MCItem:
    goal = _get(path, n, rec, "goal", str)
    sols = (_get(path, n, rec, "sol1", str), _get(path, n, rec, "sol2", str))
    label = _get(path, n, rec, "label", int)
    if label not in (0, 1):
        raise UsageError(f"{path}:{n}: key 'label' must be 0 or 1")
    return MCItem(f"Question: {goal}\nAnswer:", tuple(f" {s}" for s in sols), label)


def _hellaswag(path: Path, n: int, rec: dict) -> MCItem:
    ctx = rec.get("query") if isinstance(rec.get("query"), str) else _get(path, n, rec, "ctx", str)
    endings = _get(path, n, rec, "endings", list)
    label = rec.get("label")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or not 0 <= label < len(endings):
        raise UsageError(f"{path}:{n}: key 'label' must index 'endings'")
    return MCItem(ctx, tuple(f" {e}" for e in endings), label)


_READERS = {"arc": _arc, "piqa": _piqa, "hellaswag": _hellaswag}


def read_mc(path: str | Path, layout: str = "auto", limit: int | None = None) -> list[MCItem]:
    path = Path(path)
    layout = detect_layout(path) if layout == "auto" else layout
    if layout not in _READERS:
        raise UsageError(f"{path}: layout '{layout}' is not multiple choice (expected ARC, PIQA or HellaSwag)")
    return mc_items(path, jsonl_records(path), layout, limit)


def mc_items(source, records: list[tuple[int, dict]], layout: str, limit: int | None = None) -> list[MCItem]:
    """Multiple-choice items of numbered records (a JSONL file's lines, a dataset's rows); errors name `source`."""
    if layout not in _READERS:
        raise UsageError(f"{source}: layout '{layout}' is not multiple choice (expected ARC, PIQA or HellaSwag)")
    if limit is not None:
        records = records[:limit]
    return [_READERS[layout](source, n, rec) for n, rec in records]


def record_texts(source, records: list[tuple[int, dict]]) -> str:
    """The `text` of numbered records, joined by blank lines."""
    texts = []
    for n, rec in records:
        if not isinstance(rec.get("text"), str):
            raise UsageError(f"{source}:{n}: key 'text' missing or not a string")
        texts.append(rec["text"])
    return "\n\n".join(texts)


def calibration_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int, source: str = "data",
                        skip: int = 0):
    """`samples` windows of `seq_len` tokens at seeded random offsets: LongTensor [samples, seq_len]. `skip`: the
    windows start at or after that token (text held out for evaluation before it)."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < skip + seq_len + 1:
        need = f"seq_len={seq_len}" if not skip else f"skip + seq_len={skip + seq_len}"
        raise UsageError(f"{source}: only {ids.numel()} tokens, fewer than {need}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(skip, ids.numel() - seq_len, (samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
