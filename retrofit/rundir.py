"""What keeps a run directory (and a search's --out) safe to share, move and export (README: run directories).

- One writer: an OS lock (`flock`) on the directory itself; the kernel drops it when the holder dies, so a crash
  never leaves a stale lock behind, and a second writer is refused at once with the holder's pid.
- Portable: `inputs.json` records the absolute path and sha256 of every data file the recipe names and of a
  local model, so that the directory can be exported from any working directory and a changed file is seen.
- Export never replaces what the user owns: only an earlier adaflex export, and only with --force.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import sys
from pathlib import Path

from . import io
from .errors import UsageError
from .models import is_export_dir
from .sources import expand

INPUTS = "inputs.json"
_held: dict[str, int] = {}  # resolved directory -> open descriptor holding its lock (re-entrant per process)
_created: set[str] = set()  # directories `hold` made (removed again at release or exit while still empty)


def check_out(path: Path, flag: str = "--out") -> None:
    """`path` can be a directory: it is one, or its nearest existing ancestor is (`file/sub` cannot be made)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{flag} {path}: {'exists and ' if p == path else p.name + ' '}is a file, "
                                 "not a directory")
            return


def hold(directory: str | Path, flag: str = "--out") -> Path:
    """Create `directory` if needed and lock it for this process until it exits (or `release`). The lock is an
    flock on the directory itself, so that a run refused later (a setting the model rejects) leaves it empty."""
    directory = Path(directory)
    check_out(directory, flag)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError as e:
        raise UsageError(f"{flag} {directory}: cannot create or open ({e.strerror or e})") from None
    key = str(directory.resolve())
    if key in _held:
        os.close(fd)
        return directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{flag} {directory}: in use by another adaflex process (pid {holder(directory)}); wait "
                         "for it to finish or choose another folder") from None
    _held[key] = fd
    if created:  # a run refused before writing anything (an infeasible budget) leaves no folder behind
        _created.add(key)
        if len(_created) == 1:
            atexit.register(_remove_unused)
    return directory


def _remove_unused() -> None:
    for key in list(_created):
        release(key)




def holder(directory: Path) -> str:
    """The pid holding the flock of `directory`, from the kernel's table (Linux /proc/locks), else 'unknown'."""
    st = os.stat(directory)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        parts = line.split()
        if "FLOCK" in parts and dev in parts and "->" not in parts:
            return parts[parts.index(dev) - 1]
    return "unknown"


def release(directory: str | Path) -> None:
    key = str(Path(directory).resolve())
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock
    if key in _created:
        _created.discard(key)
        try:
            Path(key).rmdir()  # only if still empty: the folder this process made and never wrote into
        except OSError:
            pass


def is_empty(directory: Path) -> bool:
    return not any(directory.iterdir())


# ---- inputs: data files and model, with their sha256 ----


def _data_paths(obj, key: str = "") -> list[str]:
    """Every string of the recipe that names an existing file (calibration, eval, routes.train, search data)."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() if k != "model" for p in _data_paths(v, str(k))]
    if isinstance(obj, list):
        return [p for v in obj for p in _data_paths(v, key)]
    if isinstance(obj, str) and expand(obj).is_file():
        return [obj]
    return []


def inputs_of(recipe: dict, model: str | None, sources: dict | None = None) -> dict:
    """`sources`: RunData.inputs() of the run (hub datasets: id and fingerprint; generated text: its settings and
    cache key; files: path and sha256, which are taken from there instead of hashed again)."""
    sources = sources or {}
    data = {}
    for value in dict.fromkeys(_data_paths(recipe)):
        if value in sources:
            continue
        path = expand(value).resolve()
        data[value] = {"path": str(path), "sha256": io.sha256_file(path)}
    data.update(sources)
    out = {"data": data}
    if model and Path(model).is_dir():
        out["model"] = {"spec": model, "path": str(Path(model).resolve())}
    return out


def _identity(rec: dict) -> str | None:
    """What must not change across a resume: a file's sha256, a dataset's fingerprint, generated text's key."""
    return rec.get("sha256") or rec.get("fingerprint") or rec.get("cache_key")


def record_inputs(run_dir: Path, recipe: dict, model: str | None, sources: dict | None = None) -> None:
    """Write inputs.json on the first start; on a resume, a data source whose content changed is an error (the
    stages still to run would read other data than the finished ones)."""
    now = inputs_of(recipe, model, sources)
    f = run_dir / INPUTS
    if f.is_file():
        before = json.loads(f.read_text())
        for value, rec in before.get("data", {}).items():
            cur = now["data"].get(value)
            was, is_now = _identity(rec), cur and _identity(cur)
            if cur is not None and was and is_now and was != is_now:
                raise UsageError(f"{cur.get('path', value)}: changed since this run started (recorded "
                                 f"{was[:12]}, now {is_now[:12]}); rerun with another --out")
        return
    io.write_json(f, now)


def warn_changed(run_dir: Path, log=None) -> None:
    """For commands that only read the run's results (export): a changed data file is a warning."""
    log = log or (lambda msg: print(f"adaflex: warning: {msg}", file=sys.stderr))
    f = run_dir / INPUTS
    if not f.is_file():
        return
    for rec in json.loads(f.read_text()).get("data", {}).values():
        if "path" not in rec:  # a hub dataset or generated text: nothing on disk to compare
            continue
        path = Path(rec["path"])
        if not path.is_file():
            log(f"{path}: read by this run, now missing")
        elif io.sha256_file(path) != rec["sha256"]:
            log(f"{path}: changed since this run read it (sha256 {rec['sha256'][:12]})")


def model_spec(run_dir: Path, spec: str | None) -> str | None:
    """The run's MODEL; a local directory resolves to the absolute path recorded in inputs.json, so that the
    working directory does not matter (nor shows in an export's config)."""
    f = run_dir / INPUTS
    if spec and f.is_file():
        rec = json.loads(f.read_text()).get("model")
        if rec and rec.get("spec") == spec and Path(rec["path"]).is_dir():
            return rec["path"]
    return spec



def version() -> str:
    """The installed adaflex version, which plan.json and exports record."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v("adaflex")
    except PackageNotFoundError:
        return "0+unknown"

# ---- export targets ----


def check_export_target(run_dir: Path, out: Path, force: bool) -> None:
    check_out(out)
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents:
        raise UsageError(f"--out {out}: is or contains the run directory {run_dir}; choose another folder")
    if not out.is_dir() or is_empty(out):
        return
    if not force:
        raise UsageError(f"--out {out}: exists and is not empty; choose another folder (or --force to replace an "
                         "earlier adaflex export)")
    if not is_export_dir(out):
        raise UsageError(f"--out {out}: not an adaflex export (no `adaflex` block in its config.json); --force "
                         "replaces only an earlier export")
