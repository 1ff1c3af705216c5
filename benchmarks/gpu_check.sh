#!/usr/bin/env bash
# The fused relative attention on one NVIDIA H100 / H200 (issue 12), never run yet: no GPU
# was lent when the kernel was written. Needs jax[cuda12] (jax 0.10.2 or 0.11.x) and this
# repo's dependencies; about 5-10 minutes.
#
#   bash benchmarks/gpu_check.sh                 # PY=/path/to/python to choose the interpreter
#
# 1. The Triton kernels against the XLA path on small bf16 shapes (forward and all six
#    gradients; fails loudly if they disagree), before any timing is trusted.
# 2. Kernel vs XLA path, forward and forward+backward, seq 512 ... 8192 (H=16, K=128, bf16,
#    16384 query rows per call): seconds, achieved TFLOP/s, temporaries, and the largest
#    difference from the XLA path -> benchmarks/bench_attention_<device>.json
# 3. The 1.4b preset's train step at seq 2048, batch 8, mixed precision (bf16 activations),
#    full remat, with attention=xla and =pallas: tokens/s and MFU
#    -> benchmarks/bench_attention_train_<device>.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}

$PY - <<'EOF'
import jax, jax.numpy as jnp
from gopher import attention, pallas_attention

dev = jax.devices()[0]
assert dev.platform == "gpu", f"no GPU: {jax.devices()}"
print(dev.device_kind, "jax", jax.__version__)
opts = pallas_attention.options_for("gpu")
for t in (100, 256):  # a length off the tile, and one on it
    b, h, kd = 2, 4, 64
    keys = jax.random.split(jax.random.key(t), 6)
    shapes = [(b, t, h * kd)] * 3 + [(h, t + 1, kd), (h, 1, kd), (h, 1, kd)]
    args = [0.3 * jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes)]
    mask = jnp.tril(jnp.ones((t, t), bool))
    xla = lambda *a: attention.relative_attention(*a, mask, 128)
    kernel = lambda *a: pallas_attention.relative_attention(*a, opts=opts)
    for name, fn in (("xla", xla), ("pallas", kernel)):
        def value_and_grads(*a, fn=fn):
            out, vjp = jax.vjp(fn, *a)
            return (out, *vjp(jnp.ones_like(out)))
        res = jax.jit(value_and_grads)(*args)
        if name == "xla":
            want = res
    for label, g, w in zip(("out", "dq", "dk", "dv", "dr", "du", "dv_bias"), res, want):
        g, w = g.astype(jnp.float32), w.astype(jnp.float32)
        err = float(jnp.max(jnp.abs(g - w))) / max(float(jnp.max(jnp.abs(w))), 1e-30)
        print(f"T={t} {label}: relative max difference {err:.2e}")
        assert err < 5e-2, (t, label, err)
print("kernel matches the XLA path")
EOF

$PY -m experiments.bench_attention --seqs=512,1024,2048,4096,8192 --reps=20
$PY -m experiments.bench_attention --train_step --preset=1.4b --seq_len=2048 --batch=8 \
    --precision=mixed --remat=full --steps=10
