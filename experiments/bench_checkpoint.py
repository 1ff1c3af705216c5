"""How long async checkpointing blocks the training loop, against the step time.

  python -m experiments.bench_checkpoint            # the `tiny` demo setup, 8 devices

Trains `tiny` on the demo's (4, 2) mesh with ZeRO-1 and full remat, checkpointing every
`--every` steps, and prints one JSON line: the mean time `save()` blocked the loop, the
mean step time, and their ratio (the target is under 10%). Appends it, with the command,
to benchmarks/checkpoint_block.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 60, "Training steps.")
_EVERY = flags.DEFINE_integer("every", 10, "Checkpoint every N steps.")
_OUT = flags.DEFINE_string("out", "benchmarks/checkpoint_block.jsonl", "Append results here.")


def main(argv):
    del argv
    from experiments.common import configs_from_dict
    from experiments.configs import gopher as gopher_configs
    from gopher import loop

    cfg = gopher_configs.get_config("tiny")
    cfg.train.steps = _STEPS.value
    cfg.train.checkpoint_every = _EVERY.value
    cfg.train.eval_every = 10**6
    cfg.train.log_every = _EVERY.value
    cfg.train.remat = "full"
    cfg.parallel.data, cfg.parallel.model, cfg.parallel.zero = 4, 2, 1
    model_cfg, train_cfg, data_cfg, parallel = configs_from_dict(cfg)
    with tempfile.TemporaryDirectory() as workdir:
        result = loop.run(model_cfg, train_cfg, data_cfg, workdir, parallel, show_progress=False)
    step_time = result["train"]["step_time_s"]
    block = result["checkpoint_block_s"]
    record = {
        "benchmark": "async_checkpoint_block",
        "model": "tiny",
        "mesh": [4, 2],
        "checkpoint_every": _EVERY.value,
        "mean_block_s": block,
        "mean_step_s": step_time,
        "block_fraction_of_step": block / step_time,
        "command": "python -m experiments.bench_checkpoint " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(record))
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    with open(_OUT.value, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    app.run(main)
