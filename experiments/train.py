"""Train a Gopher model: `python -m experiments.train --config=FILE:PRESET --workdir=DIR`.

Writes WORKDIR/metrics.jsonl (one JSON object per line), WORKDIR/config.json and
WORKDIR/tokenizer.model. Bad input prints one line naming the value and the fix
(add --verbose for the traceback) and exits with status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/gopher.py:tiny", "Experiment config file and preset."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, config and tokenizer.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def main(argv):
    del argv
    if not _WORKDIR.value:
        common.fail("--workdir is required; pass --workdir=DIR (it is created if missing)")
    with common.user_errors(_VERBOSE.value):
        model_cfg, train_cfg, data_cfg = common.configs_from_dict(_CONFIG.value)
        from gopher import loop  # imported late so flag errors print before jax loads

        result = loop.run(model_cfg, train_cfg, data_cfg, _WORKDIR.value)
    ev = result["eval"]
    if ev:
        print(
            f"done: step {ev['step']}, train loss {result['train'].get('loss', float('nan')):.3f}, "
            f"held-out {ev['heldout_bpb']:.3f} bits/byte (unigram {result['unigram_bpb']:.3f}); "
            f"metrics in {_WORKDIR.value}/metrics.jsonl"
        )
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
