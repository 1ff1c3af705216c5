#!/usr/bin/env bash
# Everything a lent GPU (one H100 / H200) is used for, in priority order, inside one
# time budget (issues 11 and 12); results go to $OUT (default /tmp/gopher_gpu):
#
#   OUT=/tmp/out BUDGET_S=480 bash benchmarks/gpu_run.sh     # PY=... picks the interpreter
#
# 1. the Pallas (Triton) kernels against the XLA path: value and six gradients, bf16, for
#    both backwards (three kernels; one with atomic adds, gopher/pallas_attention_fused.py)
#    (experiments.bench_attention --check; exit 1 there if they disagree),
#    and cuDNN's flash attention with the position bias (gopher/attention_cudnn.py)
# 2. attention alone at seq 2048: the XLA path, the kernel with each backward (rows pallas
#    and pallas_fused) and cudnn -> bench_attention.json
# 3. train-step speed and MFU (experiments.bench, mixed precision, seq 2048) with the default
#    attention (auto: cudnn on an NVIDIA GPU) and layer loop (unrolled to 24 layers) for 1.4b
#    (profiled), 417m and 117m (profiled), 1.4b under full remat and with cuBLAS for every
#    GEMM, then the XLA path and the Pallas kernel unrolled -> train_speed_gpu.jsonl,
#    profile summaries in the log
# On an H200 (2026-12-04) an earlier version of this script took 6 minutes; results:
# benchmarks/gpu_h200/.
# Each step has its own timeout; a step whose timeout would end past BUDGET_S is skipped.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gopher_gpu}
BUDGET_S=${BUDGET_S:-480}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
mkdir -p "$OUT"
T0=$(date +%s)
step() {  # step TIMEOUT_S COMMAND...: run unless the budget is spent
  local limit=$1; shift
  local used=$(( $(date +%s) - T0 ))
  if (( used + limit > BUDGET_S )); then echo "=== skipped (budget, ${used}s used): $*"; return; fi
  echo "=== $(date +%T) +${used}s: $*"
  timeout "$limit" "$@"; echo "=== rc $? after $(( $(date +%s) - T0 ))s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import jax, jaxlib, optax, haiku; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'optax', optax.__version__, 'haiku', haiku.__version__, jax.devices())" || exit 1

step 90 $PY -m experiments.bench_attention --check --out="$OUT/bench_attention_check.json"
bench() {  # bench PRESET BATCH ATTENTION REMAT [more flags]
  step 100 $PY -m experiments.bench --preset="$1" --seq_len=2048 --batch="$2" --attention="$3" \
    --remat="$4" --precision=mixed --steps=10 --out="$OUT/train_speed_gpu.jsonl" "${@:5}"
}
step 100 $PY -m experiments.bench_attention --seqs=2048 --reps=10 --out="$OUT/bench_attention.json"
bench 1.4b 8 auto none --profile="$OUT/profile_1.4b_auto"  # auto: cudnn, layers unrolled
bench 417m 8 auto none
bench 117m 8 auto none --profile="$OUT/profile_117m_auto"
bench 1.4b 8 auto full
bench 117m 32 auto none  # 117m near 15% at batch 8: memory-bound fusions; a bigger batch?
# The position matmuls ran as XLA's Triton GEMMs at ~195 TFLOP/s (run 5): try cuBLAS for all.
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false bench 1.4b 8 auto none
bench 1.4b 8 xla full --unroll_layers=yes  # the other paths unrolled: not measured yet
bench 417m 8 xla none --unroll_layers=yes
bench 1.4b 8 pallas none --unroll_layers=yes
for p in "$OUT"/profile_*; do  # the traces, when small enough to come back
  [ -d "$p" ] && find "$p" -name perfetto_trace.json.gz -size -15M -exec cp {} "$p.json.gz" \;
  rm -rf "$p"
done
echo "=== done after $(( $(date +%s) - T0 ))s"
