#!/usr/bin/env bash
# GPU figures and checks for mskjax, as ONE script with a fixed time budget (~8 minutes).
#
#   OUT=/some/folder bash tools/gpu_check.sh          # on a GPU machine, from the repository root
#   QUICK=1 OUT=/tmp/gc bash tools/gpu_check.sh       # tiny settings: proves the script runs (CPU is fine)
#
# Needs: python3 with jax (CUDA), flax, optax, numpy, torch, torchvision. Optional: segment_anything
# (SAM's torch side; a wheel under $SAM_WHEEL or ./segment_anything*.whl is pip-installed with
# --no-index if present), pytorch_grad_cam. No network use. Writes into $OUT:
#   checks.json / checks.log      imports without ml_collections, torchvision parity on this backend
#   bench_gpu.json / bench_gpu.md classifiers: bf16 train + eval vs torch AMP, MFU, memory
#   bench_sam.json / bench_sam.md SAM vit_b encoder at 1024 and decoder vs segment_anything
#   env.txt                       versions, nvidia-smi
# and prints the tables at the end. Each phase has its own timeout; a phase that runs out keeps the
# cells it finished (benchmark.py writes them as it goes).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
QUICK="${QUICK:-0}"
START=$(date +%s)
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
CACHE="${JAX_CACHE_DIR:-$OUT/jax_cache}"

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }

if [ "$QUICK" = "1" ]; then
  T_CHECK=600; T_BENCH=900; T_SAM=300
  BENCH_ARGS=(--quick --modes eval,train,cam --budget-s 800)
  SAM_ARGS=(--quick --modes sam --budget-s 280)
  CHECK_ARGS=(--check --quick)
else
  # 8 minutes in all: environment ~10 s, checks 100 s, classifiers 290 s, SAM 70 s, printing.
  T_CHECK=100; T_BENCH=290; T_SAM=70
  BENCH_ARGS=(--models resnet50@224,efficientnet_b3@300 --batches 32,128 --modes eval,train
              --repeats 10 --warmup 2 --budget-s 280)
  SAM_ARGS=(--modes sam --sam-size 1024 --sam-boxes 16 --repeats 10 --sam-repeats 5 --budget-s 65)
  CHECK_ARGS=(--check)
fi

{
  echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; echo "python: $($PY --version 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: none"
  $PY - <<'EOF' 2>&1
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "numpy", "segment_anything", "pytorch_grad_cam",
          "ml_collections"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', 'installed')}")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__})")
try:
    import jax
    print("jax devices:", jax.devices())
except Exception as e:
    print("jax devices: error", e)
EOF
  echo "loadavg: $(cat /proc/loadavg 2>/dev/null)"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# segment_anything is pure Python: install a carried wheel if there is one (never from the network).
if ! $PY -c "import segment_anything" 2>/dev/null; then
  WHEEL="${SAM_WHEEL:-$(ls ./segment_anything*.whl 2>/dev/null | head -1)}"
  if [ -n "$WHEEL" ] && [ -f "$WHEEL" ]; then
    say "installing $WHEEL (--no-index)"
    $PY -m pip install --no-index --no-deps --quiet "$WHEEL" || say "wheel install failed: SAM torch side will be skipped"
  else
    say "segment_anything not installed and no wheel carried: SAM's PyTorch side will be skipped"
  fi
fi

say "phase 1: import and correctness checks (limit ${T_CHECK}s)"
timeout "$T_CHECK" $PY tools/benchmark.py "${CHECK_ARGS[@]}" --out "$OUT/checks.json" 2>&1 | tee "$OUT/checks.log"
CHECK_RC=${PIPESTATUS[0]}
say "checks exit status $CHECK_RC (0 = all passed, 1 = a check failed, 124 = timed out)"

say "phase 2: classifier benchmark (limit ${T_BENCH}s)"
timeout "$T_BENCH" $PY tools/benchmark.py "${BENCH_ARGS[@]}" --cache-dir "$CACHE" \
  --out "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md" 2>&1 | tee "$OUT/bench_gpu.log"
BENCH_RC=${PIPESTATUS[0]}
say "classifier benchmark exit status $BENCH_RC"

say "phase 3: SAM benchmark (limit ${T_SAM}s)"
timeout "$T_SAM" $PY tools/benchmark.py "${SAM_ARGS[@]}" --cache-dir "$CACHE" \
  --out "$OUT/bench_sam.json" --md "$OUT/bench_sam.md" 2>&1 | tee "$OUT/bench_sam.log"
SAM_RC=${PIPESTATUS[0]}
say "SAM benchmark exit status $SAM_RC"

echo
echo "================ summary ($(elapsed) s) ================"
echo "checks: exit $CHECK_RC"; grep -E "^(PASS|FAIL|ALL|SOME)" "$OUT/checks.log" || true
for f in bench_gpu bench_sam; do
  echo; echo "---- $f ----"
  if [ -f "$OUT/$f.md" ]; then cat "$OUT/$f.md"
  elif [ -f "$OUT/$f.json" ]; then echo "(no table: run cut short; partial JSON in $OUT/$f.json)"
  else echo "(no output)"; fi
done
echo "files in $OUT:"; ls -la "$OUT"
[ "$CHECK_RC" = "0" ] && [ "$BENCH_RC" = "0" ] && [ "$SAM_RC" = "0" ]
