#!/usr/bin/env bash
# Everything a lent GPU (one H100 / H200) is used for, in priority order, inside one
# time budget (issues 11 and 12); results go to $OUT (default /tmp/gopher_gpu):
#
#   OUT=/tmp/out BUDGET_S=480 bash benchmarks/gpu_run.sh     # PY=... picks the interpreter
#
# 1. the Pallas (Triton) kernels against the XLA path: value and six gradients, bf16, for
#    both backwards (three kernels; one with atomic adds, gopher/pallas_attention_fused.py)
#    (experiments.bench_attention --check; exit 1 there if they disagree)
# 2. attention alone, XLA path vs the kernel with each backward (rows pallas and
#    pallas_fused), seq 2048 and 4096, 4 and 8 warps -> bench_attention*.json
#    (8192 did not finish inside 100 s on an H200)
# 3. train-step speed and MFU (experiments.bench, mixed precision, seq 2048) of the 1.4b,
#    417m and 117m presets with attention=pallas, =pallas_fused (1.4b) and =xla, and
#    profiles of the 1.4b steps and of 117m's XLA step
#    -> train_speed_gpu.jsonl, profile summaries in the log
# On an H200 (2026-12-04) the whole script took 6 minutes; results: benchmarks/gpu_h200/.
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
step 100 $PY -m experiments.bench_attention --seqs=2048,4096 --reps=10 --out="$OUT/bench_attention.json"
step 60 $PY -m experiments.bench_attention --seqs=2048 --reps=10 --warps=8 --out="$OUT/bench_attention_w8.json"
bench 1.4b 8 pallas none --profile="$OUT/profile_1.4b"
bench 1.4b 8 pallas_fused none --profile="$OUT/profile_1.4b_fused"
bench 1.4b 8 xla full --profile="$OUT/profile_1.4b_xla"
bench 417m 8 pallas none
bench 417m 8 xla none
bench 117m 8 pallas none
bench 117m 8 xla none --profile="$OUT/profile_117m_xla"  # why 117m sits near 12% MFU
for p in "$OUT"/profile_*; do  # the traces, when small enough to come back
  [ -d "$p" ] && find "$p" -name perfetto_trace.json.gz -size -15M -exec cp {} "$p.json.gz" \;
  rm -rf "$p"
done
echo "=== done after $(( $(date +%s) - T0 ))s"
