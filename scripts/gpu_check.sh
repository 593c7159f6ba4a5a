#!/usr/bin/env bash
# The one prepared check for a machine with a CUDA GPU: build the extension for this card, run
# the CUDA tests, run the benchmarks and the feature-KL launch sweep, and leave everything
# under $OUT (default ./gpu-check).
# Finishes in under 8 minutes: every section has its own time limit, cut to what is left of
# BUDGET_S (default 460 s) for the whole script, so a hang in one still leaves the others'
# results and a slow machine cannot overrun.
#
#   OUT=/tmp/gpu-check bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
t0=$SECONDS
BUDGET_S=${BUDGET_S:-460}
section() { echo; echo "=== $1 ($((SECONDS - t0)) s)"; }
# lim N: N seconds, or what is left of the budget when that is less (at least 5)
lim() { local left=$((BUDGET_S - (SECONDS - t0))); echo $((left < $1 ? (left > 5 ? left : 5) : $1)); }

section "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
  --format=csv | tee "$OUT/device.csv"
$PY - <<'EOF' | tee "$OUT/env.txt"
import torch, triton, datetime
print("date", datetime.date.today().isoformat())
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF

section "build (this card's architecture only)"
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 timeout $(lim 300) \
  $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1
echo "build exit $? (log: build.log)"; tail -3 "$OUT/build.log"

section "tests: the DDIM op on CPU and GPU, and every CUDA-marked test"
timeout $(lim 60) $PY -m pytest -q -p no:cacheprovider tests/test_ddim_op.py 2>&1 \
  | tee "$OUT/tests_ddim.log" | tail -4
# (a module whose optional dependency is missing there must not stop the others)
timeout $(lim 150) $PY -m pytest -q -p no:cacheprovider -m cuda --continue-on-collection-errors tests 2>&1 \
  | tee "$OUT/tests_cuda.log" | tail -12

section "benchmarks"
# torch.compile of the sampler costs a compilation per case: by default only the 4-step cases.
BENCH_K=${BENCH_K:-"not (compile and (N1 or N8))"}
timeout $(lim 200) $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider -k "$BENCH_K" \
  --benchmark-min-rounds=5 --benchmark-max-time=0.25 --benchmark-warmup=on \
  --benchmark-json="$OUT/benchmarks.json" >"$OUT/benchmarks.log" 2>&1
echo "benchmarks exit $?"; tail -3 "$OUT/benchmarks.log"
$PY benchmarks/summarize.py "$OUT/benchmarks.json" >"$OUT/summary.md" && cat "$OUT/summary.md"

section "feature KL launch settings (forward kernel alone, CUDA-graph timed)"
{ timeout $(lim 120) $PY benchmarks/tune_feature_kl.py --shapes 16384x4096 \
    --dtypes float32 bfloat16 --json "$OUT/tune_kl_large.json"
  timeout $(lim 45) $PY benchmarks/tune_feature_kl.py --shapes 128x512 128x2048 \
    --dtypes float32 --json "$OUT/tune_kl_real.json"; } 2>&1 | tee "$OUT/tune_feature_kl.md"

section "done"
