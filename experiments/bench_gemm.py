"""The train step's largest fp32 GEMMs on CPU, three ways: XLA's dot, numpy's BLAS, and
numpy's BLAS called from a jitted program through `jax.pure_callback`.

    python -m experiments.bench_gemm            # the nanoGPT shape's; writes
                                                # benchmarks/bench_gemm_cpu.json

Which matmul library would speed the step, and whether a host callback could carry it: the
shapes are the fused loss's three matmuls on one chunk of 64 positions (rows = batch 8 x 64,
vocab 32000, d_model 512) and the MLP's up-projection and weight gradient (rows = 8 x 512
tokens, 4 x d_model hidden). Each way is timed in this process, one after the other, for
--rounds rounds: the median of --reps calls after a warm-up; the best round is kept.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app, flags

from experiments import common
from experiments.bench_machine import ROOT, git_revision, machine_record, median_seconds

_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds; each times every shape every way.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per measurement (median).")
_OUT = flags.DEFINE_string("out", os.path.join("benchmarks", "bench_gemm_cpu.json"), "JSON.")

# name: (left operand's shape, right operand's shape, left transposed)
SHAPES = {
    "loss logits [512,512] x [512,32000]": ((512, 512), (512, 32000), False),
    "loss dE [512,32000]^T x [512,512]": ((512, 32000), (512, 512), True),
    "loss dh [512,32000] x [32000,512]": ((512, 32000), (32000, 512), False),
    "MLP up [4096,512] x [512,2048]": ((4096, 512), (512, 2048), False),
    "MLP dW [4096,512]^T x [4096,2048]": ((4096, 512), (4096, 2048), True),
}
WAYS = ("xla", "numpy", "callback")


def gemm_flops(left: tuple, right: tuple, transposed: bool) -> float:
    """2 M K N of op(left) @ right, op the transpose when `transposed`."""
    m, k = (left[1], left[0]) if transposed else left
    assert k == right[0], (left, right, transposed)
    return 2.0 * m * k * right[1]


def calls(left: tuple, right: tuple, transposed: bool) -> dict:
    """Each way's blocking call on the same random operands; every one returns op(a) @ b."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal(left, dtype=np.float32)
    b = rng.standard_normal(right, dtype=np.float32)
    op = (lambda x: x.T) if transposed else (lambda x: x)
    out = jax.ShapeDtypeStruct((op(a).shape[0], right[1]), jnp.float32)
    xla = jax.jit(lambda x, y: op(x) @ y)
    host = jax.jit(lambda x, y: jax.pure_callback(lambda p, q: op(p) @ q, out, x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    return {
        "xla": lambda: xla(ja, jb).block_until_ready(),
        "numpy": lambda: op(a) @ b,
        "callback": lambda: host(ja, jb).block_until_ready(),
    }


def main(argv):
    del argv
    for flag in (_ROUNDS, _REPS):
        if flag.value < 1:
            common.fail(f"--{flag.name}={flag.value}: pass 1 or more")
    results = {}
    for name, (left, right, transposed) in SHAPES.items():
        fns = calls(left, right, transposed)
        flops = gemm_flops(left, right, transposed)
        best = {way: 0.0 for way in WAYS}
        for _ in range(_ROUNDS.value):
            for way in WAYS:
                seconds = median_seconds(fns[way], _REPS.value)
                best[way] = max(best[way], flops / seconds / 1e9)
        results[name] = {"gflop": flops / 1e9, **{f"{w}_gflops_per_s": best[w] for w in WAYS}}
        cells = ", ".join(f"{w} {best[w]:.0f}" for w in WAYS)
        print(f"{name}: {cells} GFLOP/s", flush=True)
    import numpy as np

    record = {
        "command": shlex.join(["python", "-m", __spec__.name, *sys.argv[1:]]),
        "machine": {**machine_record(), "numpy": np.__version__},
        "git": git_revision(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rounds": _ROUNDS.value,
        "reps": _REPS.value,
        "results": results,
    }
    out = os.path.join(ROOT, _OUT.value)  # an absolute --out stays as it is
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"saved {out}")


if __name__ == "__main__":
    app.run(main)
