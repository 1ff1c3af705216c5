"""Orbax checkpoints: async saves, resharding restores, and fallback past a bad checkpoint.

A checkpoint is one Orbax step directory holding two items:
  state  the TrainState (params, optimiser state, fp32 master, step, rng, skipped)
  meta   JSON: step, the data pipeline's state, the run's config, the tokenizer's sha256

Orbax writes each step into a temporary directory and renames it when every file is
written, so a run killed mid-save leaves no half-written step that counts. A step that
is complete on disk but unreadable (truncated or deleted files) is detected at restore;
the previous good step is used instead, with a warning naming both.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Orbax splits the saving of a replicated array across its replicas with jax slice ops;
# each distinct slice compiles once, which made the first save of the tiny demo block the
# loop for ~3 s. Below 32 MiB per slice the split saves nothing, so only big arrays use it.
_REPLICA_PARALLEL_MIN_BYTES = 32 * 2**20


def _register_array_handler() -> None:
    from orbax.checkpoint import type_handlers

    handler = type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=_REPLICA_PARALLEL_MIN_BYTES
    )
    type_handlers.register_type_handler(jax.Array, handler, override=True)


_register_array_handler()


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and the fix."""


class Checkpointer:
    """Saves and restores (TrainState, meta) under DIRECTORY/<step>/."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
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
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores step onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores, falling back past unreadable ones."""
        bad: list[int] = []
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # a damaged step raises many kinds of error
                log.info("checkpoint %s/%d is unreadable: %s", self.directory, step, str(e)[:300])
                bad.append(step)
                continue
            if bad:
                msg = (
                    f"warning: checkpoint step {bad[0]} in {self.directory} is incomplete or "
                    f"corrupt; resuming from the previous good checkpoint, step {step}"
                )
                print(msg, flush=True)
            return step, state, meta
        if bad:
            print(
                f"warning: no readable checkpoint in {self.directory} (tried steps {bad}); "
                "starting from scratch",
                flush=True,
            )
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
