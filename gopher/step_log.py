"""Reading a finished train step's metrics in the host loop (gopher/loop.py): the
non-finite guard, tokens/s and MFU over the steps since the clock last started, the
progress bar and the metrics line.

The loop dispatches step N before it reads step N-1 (`hold` then `flush`), so reading
does not stall the device. Steps that may include compilation are read but left out of
tokens/s; time the loop spends blocked on a checkpoint or an eval is excluded too.
"""

from __future__ import annotations

import math
import socket
import time
import zlib
from typing import TYPE_CHECKING

import jax
import numpy as np
from tqdm import tqdm

from gopher import metrics as metrics_lib
from gopher.config import TrainConfig

if TYPE_CHECKING:
    from gopher.loop import Run


class Diverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


def machine_count() -> int:
    """Distinct machines among the job's processes, by host name: launch.local runs
    several processes on one machine, whose CPU devices share its cores. Every process
    must call it (a collective) when there are several."""
    if jax.process_count() == 1:
        return 1
    from jax.experimental import multihost_utils

    name = np.uint32(zlib.crc32(socket.gethostname().encode()))
    return len(np.unique(multihost_utils.process_allgather(name)))


def peak_flops(train_cfg: TrainConfig) -> tuple[float | None, str]:
    """The MFU denominator over all devices, and where it came from
    (metrics.total_peak_flops: a configured peak counts once per machine on a CPU).
    Every process calls it (on a CPU, `machine_count` is a collective)."""
    dev = jax.devices()[0]
    machines = machine_count() if dev.platform == "cpu" else 1
    peak, kind = metrics_lib.total_peak_flops(
        dev, jax.device_count(), train_cfg.peak_flops, machines
    )
    source = {
        "override": "configured",
        "table": dev.device_kind,
        "measured": "measured CPU matmul",
        "unknown": "unknown (set --config.train.peak_flops)",
    }
    return peak, source[kind]


class StepLog:
    """Reads a finished step's metrics: the non-finite guard, speed, MFU and the log."""

    def __init__(self, r: Run, start: int):
        self.r, self.start = r, start
        t = r.train_cfg
        # Steps that may compile (the first, the first at each new batch size: pmap; the jit
        # path precompiled them) are read at once and left out of tokens/s.
        self.first_steps = {start + 1} | {a + 1 for a, _ in t.batch_schedule if a >= start}
        self.flops = metrics_lib.flops_per_token(r.model_cfg)
        self.flops_causal = metrics_lib.flops_per_token(r.model_cfg, causal=True)
        self.peak, source = peak_flops(t)
        r.say(f"MFU peak: {self.peak / 1e12 if self.peak else float('nan'):.2f} TFLOP/s ({source})")
        self.bad_run = 0
        self.last: dict = {}
        self.pending = None  # (step, metrics on device) of the last dispatched step
        self.clock = (start, time.perf_counter())
        self.bar = tqdm(
            total=t.steps, initial=start, disable=not r.show_progress, dynamic_ncols=True
        )

    def hold(self, step: int, metrics) -> None:
        """Keeps a dispatched step's metrics, to be read one step later (no device stall),
        with the data's accounting as of that step (the next step's batch is read first)."""
        self.flush()
        self.pending = (step, metrics, self.r.data.stats())

    def flush(self) -> None:
        """Reads the held step's metrics now (before an eval, a checkpoint or the end)."""
        if self.pending is not None:
            step, metrics, data_stats = self.pending
            self.pending = None
            self.read(step, metrics, data_stats)

    def restart_clock(self, step: int) -> None:
        """Time from here on counts toward tokens/s (eval and first-step compile do not)."""
        self.clock = (step, time.perf_counter())

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (the loop blocked on a checkpoint) out of the next tokens/s."""
        self.clock = (self.clock[0], self.clock[1] + seconds)

    def read(self, step: int, metrics, data_stats: dict) -> None:
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self._guard(step, rec)
        if step % self.r.train_cfg.log_every and step != self.r.end:
            return
        now = time.perf_counter()
        seconds = max(now - self.clock[1], 1e-9)
        tps = (self.tokens_seen(step) - self.tokens_seen(self.clock[0])) / seconds
        rec.update(step=step, kind="train", tokens=self.tokens_seen(step))
        rec["batch_size"] = self.r.train_cfg.batch_size_at(step)
        # A step that may include compilation is not a speed measurement: no tokens/s, MFU
        # or step time in its record (absent, not NaN, which strict JSON readers refuse).
        if step not in self.first_steps:
            rec["tokens_per_sec"] = tps
            rec["mfu"] = metrics_lib.mfu(tps, self.flops, self.peak)
            rec["mfu_causal"] = metrics_lib.mfu(tps, self.flops_causal, self.peak)
            rec["step_time_s"] = seconds / (step - self.clock[0])
        self.clock = (step, now)
        rec["bpt"] = rec["loss"] / math.log(2)  # bits per token
        rec.update(data_stats)
        self.r.writer.write({k: v for k, v in rec.items() if v is not None})
        self.last = rec
        mfu = (rec.get("mfu") or 0) * 100
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1f}%")

    def tokens_seen(self, step: int) -> int:
        """Tokens (global) that steps 1 .. `step` trained on, with the batch schedule."""
        return self.r.train_cfg.sequences_seen(step) * self.r.model_cfg.seq_len

    def _guard(self, step: int, rec: dict) -> None:
        finite = math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
        self.bad_run = 0 if finite else self.bad_run + 1
        if not finite:
            self.r.say(
                f"step {step}: non-finite loss {rec['loss']} / grad norm {rec['grad_norm']}; "
                f"update skipped ({int(rec['skipped'])} skipped so far)"
            )
        if self.bad_run >= self.r.train_cfg.max_bad_steps:
            raise Diverged(
                f"{self.bad_run} consecutive steps (to step {step}) had a non-finite loss or "
                f"gradient norm; stopping. The last good checkpoint in {self.r.ckpt.directory} "
                f"is intact; lower --config.train.max_lr or check the data"
            )
