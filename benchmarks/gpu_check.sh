#!/usr/bin/env bash
# The fused relative attention on one NVIDIA H100 / H200 (issue 12), never run yet: no GPU
# was lent when the kernel was written. Needs jax[cuda12] (jax 0.10.2 or 0.11.x) and this
# repo's dependencies; about 5-10 minutes.
#
#   bash benchmarks/gpu_check.sh                 # PY=/path/to/python to choose the interpreter
#
# 1. The Triton kernels against the XLA path on small bf16 shapes (forward and all six
#    gradients; exits 1 if they disagree), before any timing is trusted
#    -> benchmarks/bench_attention_check_<device>.json
# 2. Kernel vs XLA path, forward and forward+backward, seq 512 ... 8192 (H=16, K=128, bf16,
#    16384 query rows per call): seconds, achieved TFLOP/s, temporaries, and the largest
#    difference from the XLA path -> benchmarks/bench_attention_<device>.json
# 3. The 1.4b preset's train step at seq 2048, batch 8, mixed precision (bf16 activations),
#    full remat, with attention=xla and =pallas: tokens/s and MFU
#    -> benchmarks/bench_attention_train_<device>.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}

$PY -c "import jax; d = jax.devices()[0]; assert d.platform == 'gpu', jax.devices(); print(d.device_kind, 'jax', jax.__version__)"
$PY -m experiments.bench_attention --check

$PY -m experiments.bench_attention --seqs=512,1024,2048,4096,8192 --reps=20
$PY -m experiments.bench_attention --train_step --preset=1.4b --seq_len=2048 --batch=8 \
    --precision=mixed --remat=full --steps=10
