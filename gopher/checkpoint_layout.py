"""Where a workdir's checkpoints live: the active directory, its steps, their quarantine.

  WORKDIR/checkpoints/<step>/       the Orbax steps of the run (checkpoints-1, -2, ... after
                                    a restart from scratch)
  WORKDIR/checkpoints.json          RECORD: which of those directories is active, whether a
                                    restart is latched, and the history of restarts
  WORKDIR/quarantine/<dir>/<step>-<time>/  steps that did not restore, moved, never deleted

Starting over never deletes a run's steps: `--config.train.restart_from_scratch=true`
makes `checkpoint_directory` start a new subdirectory beside the old one and record it,
so that training, evaluate and sample (`active_checkpoint_directory`, which only reads)
all find the same one. Nothing here opens a step: gopher/checkpoint.py saves, restores
and quarantines them with Orbax, and re-exports the names that callers use from here.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from etils import epath

from gopher import paths
from gopher.checkpoint_errors import CheckpointError, one_line

RECORD = "checkpoints.json"  # in the workdir: which checkpoint subdirectory is active
# Orbax's mark of a finished step on gs:// (atomicity.CommitFileTemporaryPath, its default
# there): <step>/commit_success.txt, written last
COMMIT_MARKER = "commit_success.txt"


def step_dirs(directory: epath.Path) -> list[epath.Path]:
    """Committed Orbax steps: integer-named directories. Locally a step being written
    carries a tmp suffix until its rename; on gs:// Orbax writes straight into <step>/
    and commits it with a COMMIT_MARKER there, so only a step holding one counts."""
    if not directory.exists():
        return []
    gcs = paths.is_gcs(directory)
    return [
        p
        for p in directory.iterdir()
        if p.name.isdigit() and p.is_dir() and (not gcs or (p / COMMIT_MARKER).exists())
    ]


def quarantine_root(directory: epath.Path) -> epath.Path:
    """Where the steps of `directory` that did not restore are moved: beside it, outside
    the Orbax directory (on gs:// Orbax removes a subdirectory without a commit marker)."""
    return directory.parent / "quarantine" / directory.name


def quarantined(directory: epath.Path) -> list[str]:
    """The names (<step>-<time>) of the steps of `directory` moved to its quarantine."""
    root = quarantine_root(directory)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# ------------------------------------------------------- the active directory


def _has_work(directory: epath.Path) -> bool:
    """Whether `directory` holds steps, live or quarantined: a restart leaves it alone."""
    return bool(step_dirs(directory)) or bool(quarantined(directory))


def _read_record(root: epath.Path) -> dict:
    path = root / RECORD
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is unreadable ({one_line(e)}); it names the active checkpoint "
            "directory: restore it, or delete it if the run never restarted from scratch"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("active", ""), str):
        raise CheckpointError(f"{path} is not a checkpoint record; restore it from the run")
    return record


def active_checkpoint_directory(workdir: str) -> str:
    """The checkpoint directory WORKDIR's training uses now, as checkpoints.json records
    it (WORKDIR/checkpoints without a record). Reads only: evaluate and sample must not
    end a restart_from_scratch latch, as `checkpoint_directory` does for training."""
    root = paths.resolve(workdir)
    return str(root / _read_record(root).get("active", "checkpoints"))


def checkpoint_directory(workdir: str, restart_from_scratch: bool) -> str:
    """The active checkpoint directory of WORKDIR: WORKDIR/checkpoints unless a restart
    chose another, as recorded in WORKDIR/checkpoints.json.

    restart_from_scratch=True starts a new subdirectory (checkpoints-1, -2, ...) and leaves
    the old one untouched, with these rules, so that rerunning the same command after a
    preemption resumes instead of starting over again:
      - the record marks the directory a restart created as `latched`; while the flag
        stays set, later runs resume in it (the same restart, rerun);
      - a run without the flag clears the latch (the restart is over): the next run with
        the flag starts another directory;
      - an active directory with no steps (live or quarantined) holds no work: a restart
        reuses it rather than making another.
    Every process gets the same answer (process 0 decides and writes the record).
    """
    root = paths.resolve(workdir)
    record_path = root / RECORD
    record = _read_record(root)
    active = record.get("active", "checkpoints")
    latched = bool(record.get("latched", False))
    history = list(record.get("history", [])) or [{"directory": active}]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    choice, changed = active, False
    if restart_from_scratch and not latched:
        if _has_work(root / active):
            taken = {active, *(h.get("directory") for h in history)}
            k = 1
            while f"checkpoints-{k}" in taken or (root / f"checkpoints-{k}").exists():
                k += 1
            choice = f"checkpoints-{k}"
            history.append({"directory": choice, "created": stamp, "replaces": active})
            print(
                f"restart_from_scratch: training from step 0 in {root / choice}; "
                f"{root / active} is left as it is",
                flush=True,
            )
        latched, changed = True, True
    elif not restart_from_scratch and latched:
        latched, changed = False, True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Process 0's choice wins, so processes that read the record at different
        # moments cannot pick different directories.
        k = 0 if choice == "checkpoints" else int(choice.rsplit("-", 1)[1])
        k = int(multihost_utils.broadcast_one_to_all(np.int32(k)))
        choice = "checkpoints" if k == 0 else f"checkpoints-{k}"
    if changed and jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        record = {"active": choice, "latched": latched, "history": history}
        tmp = root / f"{RECORD}.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(record_path)  # whole or not at all
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoint_directory")
    return str(root / choice)
