"""Data sources a recipe can name wherever it names data (README.md, Data), resolved once per run into `RunData`.

Forms:
- a local file: plain text, JSONL (`text`, or ARC/PIQA/HellaSwag records), or Parquet/Arrow through `datasets`;
- `hf:NAME[/CONFIG][:SPLIT]`: a dataset of the Hugging Face hub (or a local dataset folder) via
  `datasets.load_dataset` and its cache, e.g. `hf:wikitext/wikitext-2-raw-v1:test`;
- `generated` / `generated:test`: text the dense model writes itself (retrofit/generated.py), so that a run needs
  no dataset at all. The test split comes from other prompts and seeds than the calibration split.

The syntax is checked when a recipe loads (`check_spec`); a source is read at preflight, and generated text is
written once the dense model is loaded, before any stage changes it. Every consumer (preflight, the cost probe,
each evaluation, the contribution tracker, the stages, routes' labelling) asks the same `RunData`, so each source
is read once per run. A source that cannot be read is one UsageError naming the recipe key and the source.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from . import io
from .data import MC_LAYOUTS, jsonl_records, layout_of, mc_items, record_texts
from .errors import UsageError

GENERATED_SPLITS = {"": "train", "test": "test"}
DATASET_SUFFIXES = (".parquet", ".arrow")
_HF = re.compile(r"hf:(?P<id>[^:\s]+)(?::(?P<split>[^\s]+))?")


@dataclass(frozen=True)
class Spec:
    raw: str
    kind: str  # file | hf | generated
    name: str = ""  # file: the path; hf: the dataset id (or local folder); generated: the split (train, test)
    split: str | None = None  # hf: the split


def parse(value: str) -> Spec:
    """The form of a data string; a malformed `hf:` or `generated:` string is a ValueError (pydantic reports it)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty data source (give a file, hf:NAME[/CONFIG][:SPLIT] or generated)")
    if value == "generated" or value.startswith("generated:"):
        split = value.partition(":")[2]
        if split not in GENERATED_SPLITS:
            raise ValueError(f"{value}: generated text has the splits `generated` (calibration) and "
                             "`generated:test` (held out)")
        return Spec(value, "generated", GENERATED_SPLITS[split])
    if value.startswith("hf:"):
        m = _HF.fullmatch(value)
        if m is None or m["id"].strip("/") == "" or "//" in m["id"]:
            raise ValueError(f"{value}: expected hf:NAME[/CONFIG][:SPLIT], e.g. hf:wikitext/wikitext-2-raw-v1:test")
        return Spec(value, "hf", m["id"], m["split"])
    return Spec(value, "file", value)


def expand(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def check_spec(value: str) -> str:
    """pydantic validator of a recipe's data string: the syntax of every form, and that a local file exists (a hub
    dataset and generated text are read at preflight)."""
    spec = parse(value)
    if spec.kind == "file" and not expand(value).is_file():
        raise ValueError(f"no such file: {value}")
    return value


# a recipe value that names data (recipe keys and method settings alike): its syntax is checked on load
DataPath = Annotated[str, AfterValidator(check_spec)]


@dataclass
class Source:
    """One resolved data source: its layout and content, and what inputs.json records of it."""

    spec: Spec
    layout: str  # text, jsonl, arc, piqa, hellaswag
    text_value: str | None = None
    items: list | None = None  # MCItem, for the multiple-choice layouts
    record: dict = field(default_factory=dict)
    ids: Any = None  # generated: one LongTensor per sequence (its prompt, then `tokens` sampled tokens)
    starts: list[int] = field(default_factory=list)  # generated: where each row's own continuation starts

    def text(self) -> str:
        if self.text_value is None:
            self.text_value = "\n\n".join(it.context + it.choices[it.label] for it in self.items)
        return self.text_value

    def mc(self, limit: int | None = None) -> list:
        if self.items is None:
            raise UsageError(f"{self.spec.raw}: layout '{self.layout}' is not multiple choice (expected ARC, PIQA or "
                             "HellaSwag)")
        return self.items[:limit] if limit is not None else self.items


# ---- loading each form ----


def _from_records(spec: Spec, source: str, records: list[tuple[int, dict]], layout: str) -> Source:
    if not records:
        raise UsageError(f"{source}: no records")
    layout = layout_of(source, *records[0]) if layout == "auto" else layout
    if layout in MC_LAYOUTS:
        return Source(spec, layout, items=mc_items(source, records, layout))
    if layout == "text":
        raise UsageError(f"{source}: layout 'text' needs a plain-text file (records: give `jsonl` or auto)")
    return Source(spec, "jsonl", text_value=record_texts(source, records))


def _dataset_records(ds) -> list[tuple[int, dict]]:
    return [(i + 1, row) for i, row in enumerate(ds)]


def _quiet_datasets() -> None:
    import datasets

    datasets.logging.set_verbosity_error()
    if os.environ.get("ADAFLEX_PROGRESS") != "1":  # its bars would break the one-line error contract on stderr
        datasets.disable_progress_bars()


def load_file(spec: Spec, layout: str) -> Source:
    path = expand(spec.name)
    if not path.is_file():
        raise UsageError(f"{spec.raw}: no such file")
    if path.suffix in DATASET_SUFFIXES:
        import datasets

        _quiet_datasets()
        try:
            ds = (datasets.Dataset.from_parquet(str(path)) if path.suffix == ".parquet"
                  else datasets.Dataset.from_file(str(path), in_memory=True))
        except Exception as e:  # noqa: BLE001 (pyarrow raises ArrowInvalid, OSError, ValueError...)
            kind = "Parquet" if path.suffix == ".parquet" else "Arrow"
            raise UsageError(f"{spec.raw}: cannot read as {kind} ({str(e).splitlines()[0][:160]})") from None
        src = _from_records(spec, spec.raw, _dataset_records(ds), layout)
    elif layout in ("text",) or (layout == "auto" and path.suffix not in (".jsonl", ".json")):
        try:
            src = Source(spec, "text", text_value=path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{spec.raw}: cannot read ({e})") from None
    else:
        src = _from_records(spec, spec.raw, jsonl_records(path), layout)
    src.record = {"path": str(path.resolve()), "sha256": io.sha256_file(path)}
    return src


def _hf_candidates(ident: str) -> list[tuple[str, str | None]]:
    """(path, config) to try: a local folder as is; NAME/CONFIG or ORG/NAME for two parts; ORG/NAME/CONFIG."""
    if expand(ident).exists():
        return [(str(expand(ident)), None)]
    parts = ident.split("/")
    if len(parts) == 1:
        return [(ident, None)]
    if len(parts) == 2:
        return [(parts[0], parts[1]), (ident, None)]
    return [("/".join(parts[:-1]), parts[-1])]


def load_hf(spec: Spec, layout: str) -> Source:
    import datasets

    _quiet_datasets()
    local = expand(spec.name)
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        try:  # a folder written by save_to_disk
            ds = datasets.load_from_disk(str(local))
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{spec.raw}: cannot load the saved dataset ({str(e).splitlines()[0][:160]})") from None
    else:
        first_error = None
        for path, config in _hf_candidates(spec.name):
            try:
                ds = datasets.load_dataset(path, config, split=spec.split)
                break
            except Exception as e:  # noqa: BLE001 (ConnectionError offline, DatasetNotFoundError, ValueError...)
                first_error = first_error or e
        else:
            offline = any(os.environ.get(k, "0").lower() not in ("0", "false", "") for k in
                          ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
            why = str(first_error).splitlines()[0][:160] if first_error else "not found"
            raise UsageError(
                f"{spec.raw}: cannot load dataset '{spec.name}' ({why}); "
                + ("offline and not in the datasets cache: " if offline else "")
                + "load it once on a connected machine (datasets.load_dataset) and copy its HF_DATASETS_CACHE "
                "here, or save it to a local file (JSONL, Parquet) and name that file") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise UsageError(f"{spec.raw}: the dataset has the splits {sorted(ds)}; name one (hf:{spec.name}:SPLIT)")
        ds = next(iter(ds.values()))
    rows = _dataset_records(ds)
    if layout == "auto" and rows and set(ds.column_names) >= {"text"} and layout_of(spec.raw, *rows[0]) == "jsonl":
        texts = [r["text"] if isinstance(r["text"], str) else "" for _, r in rows]
        # line datasets (wikitext: one row per line, each ending in a newline) join as they were written
        joined = "".join(texts) if all(t == "" or t.endswith("\n") for t in texts) else "\n\n".join(texts)
        src = Source(spec, "jsonl", text_value=joined)
    else:
        src = _from_records(spec, spec.raw, rows, layout)
    src.record = {"hf": spec.name, "split": spec.split, "fingerprint": getattr(ds, "_fingerprint", None)}
    return src


# ---- one run's data ----


def named_sources(recipe) -> list[tuple[str, str, str]]:
    """(recipe key, source, layout) of every data source the recipe names, in recipe order."""
    out = []
    cal = recipe.data.calibration
    if cal is not None:
        out.append(("data.calibration.path", cal.path, cal.layout))
    for i, ev in enumerate(recipe.eval):
        out.append((f"eval.{i}.data", ev.data, ev.layout))
    out += [(key, value, "auto") for key, value in recipe.stage_sources()]
    q = getattr(getattr(recipe, "search", None), "quality", None)
    if q is not None and q.data is not None:
        out.append(("search.quality.data", q.data, q.layout))
    return out


class RunData:
    """Every data source of one run, each read (or generated) once; `loads` counts the reads per source."""

    def __init__(self, recipe=None):
        from .generated import GeneratedConfig

        self.recipe = recipe
        self.generated = (recipe.data.generated if recipe is not None else None) or GeneratedConfig()
        self.seed = recipe.seed if recipe is not None else 0
        self.log = None
        self.model = self.tokenizer = None
        self._sources: dict[tuple[str, str], Source] = {}
        self._windows: dict[tuple, Any] = {}
        self.loads: Counter = Counter()

    # -- resolution --

    def get(self, value: str, layout: str = "auto", where: str = "data") -> Source:
        key = (value, layout)
        if key not in self._sources:
            try:
                spec = parse(value)
            except ValueError as e:
                raise UsageError(f"{where}: {e}") from None
            try:
                self._sources[key] = self._load(spec, layout, where)
            except UsageError as e:
                raise UsageError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
            self.loads[value] += 1
        return self._sources[key]

    def _load(self, spec: Spec, layout: str, where: str) -> Source:
        if spec.kind == "file":
            return load_file(spec, layout)
        if spec.kind == "hf":
            return load_hf(spec, layout)
        if self.model is None:
            raise UsageError(f"{spec.raw}: generated text needs the dense model (RunData.bind) before it is read")
        from .generated import generate

        seqs, starts, text, record = generate(self.model, self.tokenizer, spec, self.generated, self.seed, self.log)
        return Source(spec, "text", text_value=text, ids=seqs, starts=starts, record=record)

    def preflight(self) -> RunData:
        """Read every file and hub dataset the recipe names (generated text waits for the model); empty text and
        a multiple-choice evaluation on another layout fail here, before anything loads or is written."""
        for where, value, layout in named_sources(self.recipe):
            if parse(value).kind == "generated":
                continue
            src = self.get(value, layout, where)
            task = where.startswith("eval.") and self.recipe.eval[int(where.split(".")[1])].task
            if task == "mc":
                try:
                    src.mc(1)
                except UsageError as e:
                    raise UsageError(f"{where}: {e}") from None
            elif not src.text().strip():
                raise UsageError(f"{where}: {value}: holds no text")
        return self

    def bind(self, model, tokenizer, log=None) -> RunData:
        """The dense model, before any stage changes it: generated sources the recipe names are written now
        (`log` says so when one is sampled rather than read from the cache)."""
        self.model, self.tokenizer, self.log = model, tokenizer, log
        if self.recipe is not None:
            for where, value, layout in named_sources(self.recipe):
                if parse(value).kind == "generated":
                    self.get(value, layout, where)
        return self

    # -- what consumers ask --

    def text(self, value: str, layout: str = "auto", where: str = "data") -> str:
        return self.get(value, layout, where).text()

    def mc(self, value: str, layout: str = "auto", limit: int | None = None, where: str = "data") -> list:
        return self.get(value, layout, where).mc(limit)

    def calibration(self, tokenizer):
        """The recipe's calibration windows [samples, seq_len] (computed once per run)."""
        from .data import calibration_windows

        cal = self.recipe.data.calibration
        if cal is None:
            raise UsageError("recipe: data.calibration: required by this stage")
        key = (id(tokenizer), cal.path, cal.samples, cal.seq_len)
        if key not in self._windows:
            text = self.text(cal.path, cal.layout, "data.calibration.path")
            self._windows[key] = calibration_windows(tokenizer, text, cal.samples, cal.seq_len, self.seed, cal.path)
        return self._windows[key]

    def inputs(self) -> dict:
        """What inputs.json records of each source: path and sha256, hub id and fingerprint, generation key."""
        return {value: src.record for (value, _), src in self._sources.items() if src.record}


def run_data(recipe, data: RunData | None = None) -> RunData:
    """`data` when the caller resolved sources already (the CLI's --eval), adopted for `recipe`; else a new one."""
    if data is None:
        return RunData(recipe)
    fresh = RunData(recipe)
    fresh._sources, fresh.loads = data._sources, data.loads
    return fresh
