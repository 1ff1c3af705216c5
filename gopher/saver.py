"""Checkpoint cadence for the host loop (gopher/loop.py): when to save, what metadata goes
beside the state (the data position, the tokenizer's hash, the model row), and a full
disk as one line that says the previous checkpoint is intact."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from gopher import checkpoint, paths

if TYPE_CHECKING:
    from gopher.loop import Run


class Saver:
    """Checkpoint cadence; a full disk becomes one line that says the last one is intact."""

    def __init__(self, r: Run):
        self.r = r
        self.block_times: list[float] = []

    def meta(self, step: int) -> dict:
        return {
            "step": step,
            "data": self.r.data.state(),
            "tokenizer_sha256": self.r.data.tokenizer.sha256,
            "model": dataclasses.asdict(self.r.model_cfg),
        }

    def due(self, step: int) -> bool:
        return step % self.r.train_cfg.checkpoint_every == 0 or step == self.r.end

    def save(self, step: int, state, force: bool) -> float:
        """Saves (waiting for it when `force`); returns the seconds the loop was blocked."""
        t0 = time.perf_counter()
        ckpt = self.r.ckpt
        # Metrics up to this step reach storage before the checkpoint that covers them (a
        # GCS writer buffers): a kill after the save then loses no logged step.
        self.r.writer.flush()
        try:
            ckpt.save(step, self.r.engine.to_checkpoint(state), self.meta(step), force=force)
            if force:
                ckpt.wait()
        except Exception as e:  # Orbax reports a full disk as OSError or RESOURCE_EXHAUSTED
            text, remote = str(e), paths.is_remote(ckpt.directory)
            if remote and checkpoint.is_transient(e):
                # Object storage has no disk to fill: a rerun, not a fix, is what it takes.
                raise checkpoint.StorageUnavailable(
                    f"checkpoint step {step} could not be written to {ckpt.directory} "
                    f"({text[:120]}); the previous checkpoint is intact: run the same "
                    "command again once the storage answers (launch.tpu supervise retries)"
                ) from None
            if (
                not isinstance(e, OSError)
                and "No space left" not in text
                and "EXHAUSTED" not in text
            ):
                raise
            reason = "no space left on device" if "space" in text else text[:120]
            fix = "check the bucket's permissions and quota" if remote else "free disk space"
            raise ValueError(
                f"checkpoint step {step} could not be written to {ckpt.directory} ({reason}); "
                f"{fix} and restart: the previous checkpoint is intact"
            ) from None
        blocked = time.perf_counter() - t0
        if not force:
            self.block_times.append(blocked)
        return blocked
