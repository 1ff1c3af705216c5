"""Train a Gopher model: `python -m experiments.train --config=FILE:PRESET --workdir=DIR`.

Writes WORKDIR/metrics.jsonl (one JSON object per line), WORKDIR/config.json,
WORKDIR/tokenizer.model, WORKDIR/checkpoints/ and WORKDIR/tensorboard/. Restarting with
the same workdir resumes from the newest good checkpoint.

Exit status: 0 done (or nothing to train: a line says so); 1 an unexpected error (a bug:
--verbose for the traceback); 2 bad input (one line naming the value and the fix; --verbose
for the traceback), including a run too big for device memory (the line names what to
lower; the train and eval steps are checked before training where XLA reports their
memory, and a step that runs out anyway leaves every checkpoint written intact); 3
diverged (too many consecutive non-finite steps); 4 no checkpoint could be restored (each
step tried is named; nothing was deleted); 6 another process of the job died or hangs; 7
the storage kept failing with a transient error while restoring (nothing was moved; rerun
as it is); 75
preempted (SIGTERM: a checkpoint was written; run the same command again to resume); 130
interrupted (Ctrl-C: a checkpoint was written; a second Ctrl-C exits at once).

Several processes (one per host): on a Cloud TPU VM pod run the same command on every
worker (jax finds the others); elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or GOPHER_COORDINATOR_ADDRESS, GOPHER_NUM_PROCESSES,
GOPHER_PROCESS_ID), as `python -m launch.local` does on one machine.
"""

from __future__ import annotations

import logging as pylogging
import sys

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
# Another run's lock on the workdir, maybe a preempted node's that has not gone stale yet
# (launch.tpu supervise waits for it and retries; a bad flag is 2, never retried).
WORKDIR_LOCKED_EXIT_CODE = 5
# The storage, not the checkpoint, failed a restore or the workdir's write test (after
# retries): rerun as it is.
STORAGE_UNAVAILABLE_EXIT_CODE = 7


def quiet_main_thread() -> None:
    """Orbax's logs off (every save at INFO, a failed save's traceback at ERROR: the main
    thread reports each failure in one line) and an uncaught error in one line."""
    logging.set_verbosity(logging.FATAL)

    def uncaught(typ, exc, tb):
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        print(
            f"error: uncaught {typ.__name__} (a bug; rerun with --verbose for the "
            f"traceback): {first}",
            file=sys.stderr,
        )

    sys.excepthook = uncaught
    pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)


def main(argv):
    del argv
    if not _VERBOSE.value:
        quiet_main_thread()
    if not _WORKDIR.value:
        common.fail("--workdir is required; pass --workdir=DIR (it is created if missing)")
    with common.user_errors(_VERBOSE.value):
        model_cfg, train_cfg, data_cfg, parallel = common.configs_from_dict(_CONFIG.value)
        # Imported late so that flag errors print before jax loads.
        from gopher import (
            background_errors,
            checkpoint,
            distributed,
            host_memory,
            loop,
            step_log,
            step_memory,
            workdir_lock,
        )

        if not _VERBOSE.value:
            # Background threads' and finalizers' failures: one warning per message.
            background_errors.quiet()
        host_memory.run_programs_on_calling_thread()  # before jax's backends start
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
        except checkpoint.StorageUnavailable as e:
            common.fail(str(e), code=STORAGE_UNAVAILABLE_EXIT_CODE)
        except workdir_lock.WorkdirLocked as e:
            common.fail(str(e), code=WORKDIR_LOCKED_EXIT_CODE)
        except loop.Stopped as e:
            common.exit_now(e.code)  # leaves the job with the others (common.exit_now)
        except Exception as e:  # loop.run names the step; this catches any other place
            if _VERBOSE.value or not loop.is_out_of_memory(e):
                raise
            common.fail(step_memory.setup_oom_message(e, where=""))
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
