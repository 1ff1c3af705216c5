"""experiments/bench_gemm.py: the step's GEMMs as XLA dots, numpy's BLAS and a host callback.

The module registers absl flags when imported, so its functions run in a subprocess here.
"""

import json
import subprocess
import sys

from tests.test_bench import ENV, ROOT, _one_line_error


def test_every_way_computes_the_same_product_and_the_flops_are_2mkn():
    """Against numpy's product in float64: each way's result at small shapes of both
    layouts (the left operand transposed or not), and the FLOP count in closed form."""
    code = """
import json
import numpy as np
from experiments import bench_gemm as m
out = {}
for left, right, t in (((6, 5), (5, 7), False), ((5, 6), (5, 7), True)):
    fns = m.calls(left, right, t)
    rng = np.random.default_rng(0)  # the operands calls() draws
    a = rng.standard_normal(left, dtype=np.float32).astype(np.float64)
    b = rng.standard_normal(right, dtype=np.float32).astype(np.float64)
    want = (a.T if t else a) @ b
    err = {w: float(np.abs(np.asarray(f()) - want).max()) for w, f in fns.items()}
    out[str(t)] = {"err": err, "flops": m.gemm_flops(left, right, t)}
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    for t in ("False", "True"):
        assert set(got[t]["err"]) == {"xla", "numpy", "callback"}
        assert max(got[t]["err"].values()) < 1e-4, got[t]
        assert got[t]["flops"] == 2 * 6 * 5 * 7


def test_bad_counts_are_one_line():
    cmd = [sys.executable, "-m", "experiments.bench_gemm", "--reps=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    _one_line_error(proc, "--reps=0: pass 1 or more")
