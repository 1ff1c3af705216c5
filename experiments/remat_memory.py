"""Activation memory of the train step per rematerialisation policy, compiled ahead of time.

  python -m experiments.remat_memory --config=experiments/configs/gopher.py:44m \\
      --batch=8 --mesh=8,1

For each policy in gopher.model.REMAT_POLICIES, jits the sharded train step training runs
(gopher.sharding.build_train: its batch layout, gradient accumulation and attention
placement) over D*M simulated CPU devices, lowers it with abstract
ShapeDtypeStructs carrying their shardings (nothing is allocated), compiles, and reads
`memory_analysis()`: temp bytes are the per-device scratch (activations saved for the
backward pass and intermediates). Prints one line per policy and the none -> full
reduction, and writes everything, with the command, to --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from experiments import common, devices

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/gopher.py:44m", "Experiment config file and preset."
)
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch in sequences.")
_MESH = flags.DEFINE_string("mesh", "8,1", "D,M: data and model axis sizes.")
_ZERO = flags.DEFINE_enum(
    "zero", None, ["0", "1", "3"], "0 off, 1 ZeRO-1, 3 FSDP (default: --config.parallel.zero)."
)
_PRECISION = flags.DEFINE_string("precision", None, "Precision setting (default: config's).")
_OUT = flags.DEFINE_string("out", "benchmarks/remat_memory.json", "Where to write the report.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def compile_memory(model_cfg, train_cfg, mesh_dm, zero, batch, remat) -> dict:
    """memory_analysis() of the sharded train step for one remat policy."""
    import jax
    import jax.numpy as jnp

    from gopher import sharding
    from gopher.config import ParallelConfig

    d, m = mesh_dm
    parallel = ParallelConfig(data=d, model=m, zero=zero)
    mesh = sharding.make_mesh(parallel, jax.devices()[: d * m])
    # The step training builds (gopher.engine, gopher.plan): its batch layout, gradient
    # accumulation and attention placement for this mesh, with the policy asked for.
    train_cfg = dataclasses.replace(train_cfg, remat=remat)
    fns, sharded = sharding.build_train(model_cfg, train_cfg, parallel, mesh)
    state = sharding.abstract_state_with_shardings(fns, sharded)
    tokens = jax.ShapeDtypeStruct(
        (batch, model_cfg.seq_len + 1), jnp.int32, sharding=sharded.batch_sharding
    )
    start = time.perf_counter()
    compiled = sharded.train_step.lower(state, tokens).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "compile_s": round(seconds, 1),
    }


def main(argv):
    del argv
    with common.user_errors(_VERBOSE.value):
        d, m = devices.parse_mesh(_MESH.value)
        model_cfg, train_cfg, _, parallel = common.configs_from_dict(_CONFIG.value)
        zero = parallel.zero if _ZERO.value is None else int(_ZERO.value)
        if _PRECISION.value:
            train_cfg = dataclasses.replace(train_cfg, precision=_PRECISION.value)
        devices.ensure_cpu_devices(d * m)
        import jax

        from gopher.model import REMAT_POLICIES

        devices.require_devices(d * m, _MESH.value)
        policies = {}
        for name in REMAT_POLICIES:
            policies[name] = compile_memory(model_cfg, train_cfg, (d, m), zero, _BATCH.value, name)
            print(
                f"{name:34s} temp {policies[name]['temp_bytes'] / 2**20:10.1f} MiB per device "
                f"(compiled in {policies[name]['compile_s']} s)",
                flush=True,
            )
    none, full = policies["none"]["temp_bytes"], policies["full"]["temp_bytes"]
    reduction = 1.0 - full / none
    print(f"none -> full: {reduction:.1%} less temp memory per device")
    report = {
        "command": "python -m experiments.remat_memory " + shlex.join(sys.argv[1:]),
        "model": model_cfg.name,
        "batch": _BATCH.value,
        "seq_len": model_cfg.seq_len,
        "mesh": [d, m],
        "zero": zero,
        "precision": train_cfg.precision,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "policies": policies,
        "reduction_none_to_full": round(reduction, 4),
    }
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {_OUT.value}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
