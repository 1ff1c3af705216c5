"""Train a Gopher model: `python -m experiments.train --config=FILE:PRESET --workdir=DIR`.

Writes WORKDIR/metrics.jsonl (one JSON object per line), WORKDIR/config.json,
WORKDIR/tokenizer.model, WORKDIR/checkpoints/ and WORKDIR/tensorboard/. Restarting with
the same workdir resumes from the newest good checkpoint.

Exit status: 0 done; 2 bad input (one line naming the value and the fix; --verbose for
the traceback); 3 diverged (too many consecutive non-finite steps); 75 preempted
(SIGTERM: a checkpoint was written; run the same command again to resume).
"""

from __future__ import annotations

import logging as pylogging
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/gopher.py:tiny", "Experiment config file and preset."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, tokenizer.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def main(argv):
    del argv
    if not _VERBOSE.value:
        # Orbax logs every save at INFO and, for a failed save, a traceback at ERROR; the
        # main thread reports every failure itself in one line.
        logging.set_verbosity(logging.FATAL)
        # A failed async save also raises in Orbax's and tensorstore's threads; the main
        # thread reports it in one line, so background copies become one warning each.
        seen = set()

        def quiet(kind, exc):
            text = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if text not in seen:
                seen.add(text)
                print(f"warning: {kind}: {text}", file=sys.stderr)

        threading.excepthook = lambda args: quiet("background thread", args.exc_value)
        sys.unraisablehook = lambda u: quiet("ignored in background", u.exc_value)
        sys.excepthook = lambda typ, exc, tb: quiet("uncaught (rerun with --verbose)", exc)
        pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
    if not _WORKDIR.value:
        common.fail("--workdir is required; pass --workdir=DIR (it is created if missing)")
    with common.user_errors(_VERBOSE.value):
        model_cfg, train_cfg, data_cfg, parallel = common.configs_from_dict(_CONFIG.value)
        from gopher import loop  # imported late so flag errors print before jax loads

        try:
            result = loop.run(model_cfg, train_cfg, data_cfg, _WORKDIR.value, parallel)
        except loop.Diverged as e:
            common.fail(str(e), code=loop.DIVERGED_EXIT_CODE)
    ev, tr = result["eval"], result["train"]
    if ev:
        print(
            f"done: step {ev['step']}, train loss {tr.get('loss', float('nan')):.3f}, "
            f"held-out {ev['heldout_bpb']:.3f} bits/byte (unigram {result['unigram_bpb']:.3f}); "
            f"metrics in {_WORKDIR.value}/metrics.jsonl"
        )
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
