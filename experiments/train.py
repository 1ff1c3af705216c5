"""Train a Gopher model: `python -m experiments.train --config=FILE:PRESET --workdir=DIR`.

Writes WORKDIR/metrics.jsonl (one JSON object per line), WORKDIR/config.json,
WORKDIR/tokenizer.model, WORKDIR/checkpoints/ and WORKDIR/tensorboard/. Restarting with
the same workdir resumes from the newest good checkpoint.

Exit status: 0 done; 2 bad input (one line naming the value and the fix; --verbose for
the traceback); 3 diverged (too many consecutive non-finite steps); 4 no checkpoint could
be restored (each step tried is named; nothing was deleted); 6 another process of the
job died or hangs; 75 preempted (SIGTERM: a checkpoint was written; run the same command
again to resume); 130 interrupted (Ctrl-C: a checkpoint was written; a second Ctrl-C
exits at once).

Several processes (one per host): on a Cloud TPU VM pod run the same command on every
worker (jax finds the others); elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or GOPHER_COORDINATOR_ADDRESS, GOPHER_NUM_PROCESSES,
GOPHER_PROCESS_ID), as `python -m launch.local` does on one machine.
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a multi-process job."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
RESTORE_FAILED_EXIT_CODE = 4


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
        # Imported late so that flag errors print before jax loads.
        from gopher import checkpoint, distributed, loop, step_log

        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        try:
            result = loop.run(model_cfg, train_cfg, data_cfg, _WORKDIR.value, parallel)
        except KeyboardInterrupt:  # before the first step: there is nothing to checkpoint
            common.fail(
                "interrupted before training started; nothing was written that a rerun "
                "does not redo",
                code=loop.INTERRUPTED_EXIT_CODE,
            )
        except step_log.Diverged as e:
            common.fail(str(e), code=loop.DIVERGED_EXIT_CODE)
        except checkpoint.RestoreFailed as e:
            common.fail(str(e), code=RESTORE_FAILED_EXIT_CODE)
        except loop.Stopped as e:
            common.exit_now(e.code)  # leaves the job with the others (common.exit_now)
        distributed.shutdown()
    ev, tr = result["eval"], result["train"]
    if ev and result.get("chief", True):
        print(
            f"done: step {ev['step']}, train loss {tr.get('loss', float('nan')):.3f}, "
            f"held-out {ev['heldout_bpb']:.3f} bits/byte (unigram {result['unigram_bpb']:.3f}); "
            f"metrics in {_WORKDIR.value}/metrics.jsonl"
        )
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
