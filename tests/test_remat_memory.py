"""experiments/remat_memory.py compiles the train step training runs: with microbatches its
temp bytes are those of the planner's compile (gopher.plan, which builds the step as
gopher.engine does), for the same mesh and policy.

The module registers absl flags when imported, so it runs in a short subprocess here."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CODE = """
import dataclasses, json
import jax
from experiments import common, remat_memory
from experiments.configs import gopher as gopher_configs
from gopher import plan
from gopher.config import ParallelConfig

model_cfg, train_cfg, _, _ = common.configs_from_dict(gopher_configs.get_config("test"))
train_cfg = dataclasses.replace(train_cfg, batch_size=8, microbatches=2, remat="none")
out = {}
for policy in ("full",):
    got = remat_memory.compile_memory(model_cfg, train_cfg, (2, 2), 1, 8, policy)
    mesh = plan.physical_mesh(jax.devices()[:4], (1, 2, 2))
    hw = plan.hardware(jax.devices()[:4], "cpu")
    cfg = dataclasses.replace(train_cfg, remat=policy)
    want = plan.plan(model_cfg, cfg, ParallelConfig(data=2, model=2, zero=1), mesh, hw)
    out[policy] = [got["temp_bytes"], want["memory_analysis"]["temp"]]
print(json.dumps(out))
"""


def test_remat_memory_compiles_the_step_training_runs():
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CODE], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    (got, want) = out["full"]
    assert got == want  # before it built the step its own way: 2,388,752 against 1,679,432
