#!/usr/bin/env bash
# One call on a lent GPU machine (device tool): CUDA kernel tests (bf16 included), then the kernel benchmark
# (fp16; BENCH_DTYPES="float16 bfloat16" for both). Run from the repo root; results go to $OUT (or ./runs/gpu). Python packages missing on
# the machine travel as wheels in .whl/ (see tests/bench/README.md, "GPU benchmark").
set -uo pipefail
out=${OUT:-runs/gpu}; mkdir -p "$out"
if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import adaflex.kernels" 2>/dev/null; then  # not installed: map the package onto the repo
  mkdir -p /tmp/ns/adaflex
  for d in cli retrofit search kernels recipes; do ln -sfn "$PWD/$d" "/tmp/ns/adaflex/$d"; done
  export PYTHONPATH=/tmp/ns${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_cuda.py 2>&1 | tee "$out/cuda-tests.log" | tail -25
for dt in ${BENCH_DTYPES:-float16}; do
  timeout ${BENCH_TIMEOUT:-300} python3 tests/bench/kernels.py --dtype "$dt" --json "$out/kernels-$dt.json" 2>"$out/kernels-$dt.err" \
    | tee "$out/kernels-$dt.md"
  tail -3 "$out/kernels-$dt.err"
done
