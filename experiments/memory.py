"""Per-device memory of the train state under a mesh and a ZeRO setting.

  python -m experiments.memory --config=experiments/configs/gopher.py:44m \\
      --mesh=4,2 --zero=1 --precision=bf16_master --json

allocates the state on D*M simulated CPU devices (mesh replica=1, data=D, model=M) and
reads the bytes from the arrays' addressable shards:
  {"mesh": [D, M], "per_device_bytes": {"params": ..., "opt_state": ...},
   "total_bytes": {...}, "logical_bytes": {...}, ...}
per_device is the max over devices, total the sum over devices (replicas counted),
logical the arrays' own sizes; opt_state includes the fp32 master copy (bf16_master).
`--abstract` computes the same numbers from the shardings without allocating (for
models that do not fit in RAM, e.g. 280b on --mesh=256,16); `--config.model.*`
overrides any model field; `--out=FILE` appends the result, with the command, to FILE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import common, devices

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/gopher.py:44m", "Experiment config file and preset."
)
_MESH = flags.DEFINE_string("mesh", "8,1", "D,M: data and model axis sizes.")
_ZERO = flags.DEFINE_enum(
    "zero", None, ["0", "1", "3"], "0 off, 1 ZeRO-1, 3 FSDP (default: --config.parallel.zero)."
)
_PRECISION = flags.DEFINE_string("precision", None, "Precision setting (default: config's).")
_ABSTRACT = flags.DEFINE_bool("abstract", False, "Compute from shardings; allocate nothing.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_OUT = flags.DEFINE_string("out", "", "If set, append the JSON line, with the command, here.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def measure(model_cfg, train_cfg, mesh_dm, zero, precision, abstract=False) -> dict:
    import jax

    from gopher import partition, sharding, train
    from gopher.config import ParallelConfig

    d, m = mesh_dm
    parallel = ParallelConfig(data=d, model=m, zero=zero)
    train_cfg = dataclasses.replace(train_cfg, precision=precision)
    if abstract:
        sizes = {"replica": 1, "data": d, "model": m}
        fns = train.make_train_functions(model_cfg, train_cfg, precision=precision)
        state = jax.eval_shape(fns.init, jax.random.key(0))
        specs = partition.state_partition_specs(state, sizes, zero)
        notes = specs.notes
        n = d * m

        def per_device(part):
            return sum(
                sharding.abstract_bytes_per_device(
                    getattr(state, f), getattr(specs.specs, f), sizes
                )
                for f in part
            )

        per = {"params": per_device(["params"]), "opt_state": per_device(["opt_state", "master"])}
        total = {k: v * n for k, v in per.items()}
    else:
        devices.require_devices(d * m, f"{d},{m}")
        mesh = sharding.make_mesh(parallel, jax.devices()[: d * m])
        fns = train.make_train_functions(
            model_cfg,
            train_cfg,
            precision=precision,
            activation_constraint=sharding.activation_constraint(mesh),
        )
        sharded = sharding.shard_train(fns, mesh, parallel, model_cfg)
        state = sharded.init(jax.random.key(0))
        jax.block_until_ready(state)
        notes = sharded.notes
        params = sharding.bytes_per_device(state.params)
        opt = sharding.bytes_per_device((state.opt_state, state.master))
        per = {"params": max(params.values()), "opt_state": max(opt.values())}
        total = {"params": sum(params.values()), "opt_state": sum(opt.values())}

    def logical(tree):
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return {
        "mesh": [d, m],
        "per_device_bytes": per,
        "total_bytes": total,
        "logical_bytes": {
            "params": logical(state.params),
            "opt_state": logical((state.opt_state, state.master)),
        },
        "model": model_cfg.name,
        "zero": zero,
        "precision": precision,
        "abstract": abstract,
        "not_partitioned": list(notes),
    }


def _gib(x: int) -> str:
    return f"{x / 2**30:8.3f} GiB"


def main(argv):
    del argv
    with common.user_errors(_VERBOSE.value):
        d, m = devices.parse_mesh(_MESH.value)
        model_cfg, train_cfg, _, parallel = common.configs_from_dict(_CONFIG.value)
        zero = parallel.zero if _ZERO.value is None else int(_ZERO.value)
        precision = _PRECISION.value or train_cfg.precision
        if _ABSTRACT.value:
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        else:
            devices.ensure_cpu_devices(d * m)
        result = measure(model_cfg, train_cfg, (d, m), zero, precision, _ABSTRACT.value)
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        command = "python -m experiments.memory " + shlex.join(sys.argv[1:])
        with open(_OUT.value, "a") as f:
            f.write(json.dumps({"command": command, **result}) + "\n")
    if _JSON.value:
        print(json.dumps(result))
        return 0
    print(
        f"{result['model']} on mesh data={d} model={m}, zero={result['zero']}, "
        f"{result['precision']}{' (abstract)' if _ABSTRACT.value else ''}"
    )
    for part in ("params", "opt_state"):
        print(
            f"  {part:9s} per device {_gib(result['per_device_bytes'][part])}   "
            f"total {_gib(result['total_bytes'][part])}   "
            f"logical {_gib(result['logical_bytes'][part])}"
        )
    for note in result["not_partitioned"]:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
