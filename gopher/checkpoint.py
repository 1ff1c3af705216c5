"""Orbax checkpoints that cannot lose work: async saves, resharding restores, quarantine.

A checkpoint is one Orbax step directory holding two items:
  state  the TrainState (params, optimiser state, fp32 master, step, rng, skipped)
  meta   JSON: step, the data pipeline's state, the run's config, the tokenizer's sha256

Orbax writes each step into a temporary directory and renames it when every file is
written (on gs://, where a rename is a copy, it writes in place and commits the step with
a commit_success.txt written last), so a run killed mid-save leaves no half-written step
that counts.

A restore that fails never trains from scratch (a fresh run plus `max_to_keep` would
garbage-collect the steps it could not read):
  - a transient read error (OSError, a timeout, RESOURCE_EXHAUSTED, UNAVAILABLE, ...) is
    retried with backoff; a structurally damaged step (missing or truncated files, bad
    metadata) is tried once;
  - a step that still fails with a transient error after its retries stops the run with
    `StorageUnavailable` (exit 7, which `launch.tpu supervise` retries): the storage, not
    the step, is at fault, so nothing is quarantined and no older step is resumed;
  - if a newer step is damaged but an older one restores, the run resumes from the
    older one and the bad step is quarantined: moved, never deleted, to
    WORKDIR/quarantine/<checkpoint dir>/<step>-<time>/ (outside the Orbax directory: on
    gs:// Orbax removes any subdirectory without a commit marker as unfinished), with a
    line in <checkpoint dir>/quarantine.jsonl; a later save of that step number is free;
  - if no step restores, `RestoreFailed` names every step and why, and nothing moves;
  - with several processes, a host whose read of the newest step fails stops the job
    (`RestoreFailed`) instead of falling back alone: each host decides by its own read,
    and one host on an older step than the others would build a state of two steps;
  - a step whose arrays have other shapes than the model asks for (another config) is
    reported as "a model of another shape", naming the shapes and the config fields its
    `meta` records, not as damaged.
Starting over is explicit: `--config.train.restart_from_scratch=true` makes
`checkpoint_directory` start a new checkpoint subdirectory beside the old one.

Two neighbours hold what is not Orbax, and this module re-exports the names callers use:
gopher/checkpoint_layout.py, where a workdir's checkpoints live (the active directory and
its record, the committed steps, the quarantine), and gopher/checkpoint_errors.py, the
errors above and the tests of what a raw read error is (transient, a shape refusal).

Read-only users (evaluate, sample) open a `Checkpointer(..., read_only=True)` on
`active_checkpoint_directory(workdir)`: nothing on disk changes (no record, no directory,
no tmp cleanup, no quarantine); an unreadable newest step is skipped with a one-line
warning on stderr. Background copies of a restore failure reported here are dropped by
`gopher.background_errors.quiet()`, which the command-line tools install.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from gopher import background_errors, paths
from gopher.checkpoint_errors import (
    CheckpointError,
    RestoreFailed,
    StorageUnavailable,
    is_transient,
    one_line,
    shape_mismatch,
)
from gopher.checkpoint_layout import (
    active_checkpoint_directory,
    checkpoint_directory,
    quarantine_root,
    quarantined,
    step_dirs,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "RestoreFailed",
    "SHAPE_FIELDS",
    "StorageUnavailable",
    "active_checkpoint_directory",
    "checkpoint_directory",
    "is_transient",
    "step_dirs",
]
log = logging.getLogger(__name__)

# Orbax splits the saving of a replicated array across its replicas with jax slice ops;
# each distinct slice compiles once, which made the first save of the tiny demo block the
# loop for ~3 s. Below 32 MiB per slice the split saves nothing, so only big arrays use it.
_REPLICA_PARALLEL_MIN_BYTES = 32 * 2**20
_RESTART_HINT = (
    "fix the storage and rerun, or pass --config.train.restart_from_scratch=true to train "
    "from step 0 in a new checkpoint subdirectory (these steps stay where they are)"
)


def _register_array_handler() -> None:
    from orbax.checkpoint import type_handlers

    handler = type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=_REPLICA_PARALLEL_MIN_BYTES
    )
    type_handlers.register_type_handler(jax.Array, handler, override=True)


_register_array_handler()


# Fields of ModelConfig that decide the shapes of the parameters (seq_len does not:
# relative attention has no position table).
SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "key_size", "ffw_multiplier")
_OTHER_SHAPE = "a model of another shape"
_OTHER_PRECISION = "a state of another precision setting"
_CONFIG_MISMATCH = (_OTHER_SHAPE, _OTHER_PRECISION)  # the config differs, not the storage


def _absolute(path: str) -> str:
    """paths.resolve's spelling, as the rest of the workdir has it: local paths absolute
    and ~ expanded (the shell leaves --workdir=~/x as it is), a URL (gs://...) as it is."""
    return os.fspath(paths.resolve(path))


def _several_processes() -> bool:
    return jax.process_count() > 1


class Checkpointer:
    """Saves and restores (TrainState, meta) under DIRECTORY/<step>/ (local or gs://).

    `restore_tries` and `retry_backoff_s` set the retries of a transient read error:
    waits of backoff, 2 * backoff, ... seconds between tries. `read_only`: restores
    only, and writes, creates, cleans up and moves nothing (evaluate and sample read a
    run that may be training at the same time); `restore_latest` then skips an
    unreadable step with a warning instead of quarantining it.
    """

    def __init__(
        self,
        directory: str,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        restore_tries: int = 3,
        retry_backoff_s: float = 1.0,
        read_only: bool = False,
        params_only: bool = False,
    ):
        """`params_only`: restores read only the parameters (sampling, evaluation), not
        the optimiser's moments and master copy, 3x to 7x the parameters' bytes; the
        rest of the state comes back None."""
        self.params_only = params_only
        self.directory = _absolute(directory)
        self._path = epath.Path(self.directory)
        self.restore_tries = max(1, restore_tries)
        self.retry_backoff_s = retry_backoff_s
        self.read_only = read_only
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,
            )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta`; returns whether it saved."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only; it saves nothing")
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores step onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
        if self.params_only:
            item = {"params": abstract_state.params}
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=item,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True,
                    ),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            none = dict.fromkeys(abstract_state._fields)
            return type(abstract_state)(**{**none, "params": out["state"]["params"]}), out["meta"]
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["meta"]

    def _restore_with_retries(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        for attempt in range(self.restore_tries):
            try:
                with background_errors.muted():
                    return self.restore(step, abstract_state)
            except Exception as e:  # a damaged step raises many kinds of error
                background_errors.restore_failed(f"{self.directory}/{step}/")
                last = attempt + 1 == self.restore_tries
                if not is_transient(e) or last:
                    # For the message; an exception type without a __dict__ refuses it.
                    with contextlib.suppress(AttributeError):
                        e.tries = attempt + 1
                    raise
                wait = self.retry_backoff_s * 2**attempt
                log.warning(
                    "checkpoint %s/%d: transient read error (%s); retrying in %.1f s",
                    self.directory,
                    step,
                    one_line(e),
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _saved_model(self, step: int) -> dict:
        """The model config that step's meta records ({} if it records none)."""
        try:
            with background_errors.muted():
                out = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )
            model = out["meta"].get("model")
        except Exception:  # the meta is damaged too: the shapes alone must do
            return {}
        return model if isinstance(model, dict) else {}

    def _why(self, step: int, e: BaseException, model: dict | None) -> str:
        """Why step did not restore: transient, damaged, or a model of another shape."""
        shapes = shape_mismatch(e)
        if shapes is None:
            tries = getattr(e, "tries", 1)
            if is_transient(e):
                return f"transient, {tries} tries: {one_line(e)}"
            root, seen = e, {id(e)}  # Orbax wraps TensorStore's error: it names the array
            while root.__cause__ is not None and id(root.__cause__) not in seen:
                root = root.__cause__
                seen.add(id(root))
            text = str(root)
            if "tree structures do not match" in text and "master" in text:
                return (
                    f"{_OTHER_PRECISION}: the fp32 master copy bf16_master keeps is in one "
                    "state and not the other; use the run's --config.train.precision"
                )
            return f"damaged: {one_line(root)}"
        requested, stored = shapes
        why = f"{_OTHER_SHAPE}: an array of shape {stored} where this model has {requested}"
        saved = self._saved_model(step)
        fields = [k for k in SHAPE_FIELDS if k in saved]
        differ = [k for k in fields if model and k in model and model[k] != saved[k]]
        if differ:
            why += "; its model has " + ", ".join(
                f"{k}={saved[k]} (this one {model[k]})" for k in differ
            )
        elif fields:
            why += "; its model has " + ", ".join(f"{k}={saved[k]}" for k in fields)
        return why

    def restore_step(
        self, step: int, abstract_state: Any, model: dict | None = None
    ) -> tuple[Any, dict]:
        """Restores exactly `step`; CheckpointError (one line) names why it cannot."""
        steps = self.steps()
        if step not in steps:
            moved = [q for q in quarantined(self._path) if q.split("-", 1)[0] == str(step)]
            where = (
                f"; it was quarantined as unreadable to {quarantine_root(self._path)}/"
                f"{moved[-1]} (see {self.directory}/quarantine.jsonl)"
                if moved
                else ""
            )
            raise CheckpointError(
                f"{self.directory} has no checkpoint step {step} (it has {steps}){where}; "
                "pass one of those or omit --step for the newest"
            )
        try:
            return self._restore_with_retries(step, abstract_state)
        except Exception as e:
            log.info("checkpoint %s/%d is unreadable: %s", self.directory, step, str(e))
            why = self._why(step, e, model)
            others = [s for s in steps if s != step]
            if why.startswith(_CONFIG_MISMATCH):
                fix = "restore with the config of the model it holds"
            elif others:
                fix = f"pass another --step (it has {others}) or omit --step for the newest"
            else:
                fix = "it is the only step; fix the storage or train again"
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} does not restore ({why}); {fix}"
            ) from e

    def restore_latest(
        self, abstract_state: Any, model: dict | None = None
    ) -> tuple[int, Any, dict] | None:
        """The newest step that restores, as (step, state, meta).

        None only when the directory holds no steps at all (live or quarantined). Newer
        steps that fail are quarantined once an older one restores (read-only: skipped,
        with a warning); if none restores, raises RestoreFailed and moves nothing.
        `model`: the config (a dict) the state was built from, to name the fields that
        differ when a step holds a model of another shape.
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                state, meta = self._restore_with_retries(step, abstract_state)
            except Exception as e:
                log.info("checkpoint %s/%d is unreadable: %s", self.directory, step, str(e))
                why = self._why(step, e, model)
                if why.startswith("transient") and not self.read_only:
                    # An older step would be resumed and this good one quarantined for an
                    # outage of the storage: stop instead, for a rerun once it answers.
                    raise StorageUnavailable(
                        f"checkpoint step {step} in {self.directory} could not be read "
                        f"({why}); nothing was moved; run the same command again once the "
                        "storage answers (launch.tpu supervise retries by itself)"
                    ) from e
                alone = _several_processes() and not self.read_only
                if alone and not why.startswith(_CONFIG_MISMATCH):
                    raise RestoreFailed(
                        f"checkpoint step {step} in {self.directory} does not restore on "
                        f"process {jax.process_index()} ({why}); with several processes no "
                        "host resumes an older step alone (the job's state would mix two "
                        "steps), and nothing was moved. If the step is damaged, move "
                        f"{self.directory}/{step} out of the directory and rerun; "
                        f"otherwise {_RESTART_HINT}"
                    ) from e
                failed.append((step, why))
                continue
            if failed and self.read_only:
                skipped = "; ".join(f"step {s} ({why})" for s, why in failed)
                print(
                    f"warning: skipped checkpoint {skipped} in {self.directory}; loaded "
                    f"step {step}, the newest that restores (nothing was moved)",
                    file=sys.stderr,
                    flush=True,
                )
            elif failed:
                for bad, why in failed:
                    self._quarantine(bad, why)
                bad_steps = ", ".join(str(s) for s, _ in failed)
                print(
                    f"warning: checkpoint step {bad_steps} in {self.directory} is incomplete "
                    f"or corrupt (quarantined in {quarantine_root(self._path)}); resuming "
                    f"from the previous good checkpoint, step {step}",
                    flush=True,
                )
            return step, state, meta
        if failed:
            other_shape = all(why.startswith(_CONFIG_MISMATCH) for _, why in failed)
            if other_shape:
                tried = f"steps {', '.join(str(s) for s, _ in failed)} each hold {failed[0][1]}"
                hint = (
                    "train with the model config these checkpoints were written with (the "
                    "fields named above), or use a new --workdir"
                )
            else:
                tried = "; ".join(f"step {s} ({why})" for s, why in failed)
                hint = _RESTART_HINT
            raise RestoreFailed(
                f"no checkpoint in {self.directory} restores, nothing was moved or deleted: "
                f"{tried}. To proceed, {hint}",
                other_shape=other_shape,
                tried=tried,
            )
        if quarantined(self._path):
            raise RestoreFailed(
                f"{self.directory} has no steps left but quarantined ones in "
                f"{quarantine_root(self._path)} (see {self.directory}/quarantine.jsonl); "
                + (  # a loader (evaluate, sample) has no training flag to offer
                    "move a repaired step back, then rerun"
                    if self.read_only
                    else f"move a repaired step back, or {_RESTART_HINT}"
                )
            )
        return None

    def _quarantine(self, step: int, why: str) -> None:
        """Moves step out of Orbax's reach (GC, tmp cleanup, a later save of step)."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = quarantine_root(self._path) / f"{step}-{stamp}"
        if jax.process_index() == 0:
            try:
                paths.move_tree(self._path / str(step), target)  # gs://: copies, deletes
                entry = {"step": step, "error": why, "time": stamp, "moved_to": str(target)}
                paths.append_text(str(self._path / "quarantine.jsonl"), json.dumps(entry) + "\n")
            except Exception as e:
                raise RestoreFailed(
                    f"checkpoint step {step} in {self.directory} is unreadable ({why}) and "
                    f"could not be moved to {target} ({one_line(e)}); nothing was deleted. "
                    f"To proceed, {_RESTART_HINT}"
                ) from e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine {self.directory}/{step}")
        self._manager.reload()  # forget the moved step

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
