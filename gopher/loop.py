"""The host loop: data, the parallel engine, progress, metrics, eval and checkpoints.

Side effects live here (files, clocks, signals, progress bars); the numerics are the
pure functions of gopher/train.py behind an Engine (gopher/engine.py). Like nanodo,
the loop dispatches step N before it reads step N-1's metrics, so reading them does
not stall the device.

The pieces, in the order a run meets them:
  open_workdir      check it, take the workdir lock, check the experiment against it
  build_data        this process's rows of the data; every process agrees on it
  check_memory      the train and eval steps compiled ahead of time; they must fit
                    (gopher/step_memory.py)
  restore_or_init   the newest good checkpoint, or a fresh state (never a silent restart);
                    only then is the experiment recorded (WORKDIR/config.json), so a run
                    that fails before it leaves nothing a corrected rerun trips over
  StepLog           reads a step's metrics: non-finite guard, tokens/s, MFU, the log line
                    (gopher/step_log.py)
  evaluate          held-out bits per byte per source, summed over every host's rows
  Saver             checkpoint cadence and the one-line disk-full error (gopher/saver)
  train_steps       the step loop itself
With several processes only process 0 writes metrics, TensorBoard, the lock and the
config; checkpoints go through Orbax's multi-process protocol. A run in an existing
workdir resumes and appends to metrics.jsonl; the steps redone after its checkpoint are
logged again with the same values. SIGTERM / SIGINT checkpoint and exit (gopher/stopping).
Running out of device memory is a one-line OutOfMemory (a ValueError: the CLI exits 2)
naming what to lower (gopher/step_memory.py); checkpoints go before the eval of their
step, so a failing eval loses no training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from gopher import checkpoint as checkpoint_lib
from gopher import distributed, host_memory, paths, workdir_lock
from gopher import engine as engine_lib
from gopher import metrics as metrics_lib
from gopher import workdir as workdir_lib
from gopher.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig
from gopher.data.pipeline import Pipeline, build_pipeline
from gopher.saver import Saver
from gopher.step_log import StepLog
from gopher.step_memory import (
    OutOfMemory,
    check_memory,
    is_out_of_memory,
    setup_oom_message,
    step_oom_message,
)
from gopher.stopping import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Stopper, Watchdog

DIVERGED_EXIT_CODE = 3  # too many consecutive non-finite steps
# Tests only: seconds to sleep after each step, so that a kill lands mid-run.
_TEST_STEP_SLEEP_S = float(os.environ.get("GOPHER_TEST_STEP_SLEEP_S") or 0.0)
__all__ = [
    "DIVERGED_EXIT_CODE",
    "INTERRUPTED_EXIT_CODE",
    "PREEMPTED_EXIT_CODE",
    "OutOfMemory",
    "is_out_of_memory",
    "run",
]


class Stopped(SystemExit):
    """The run checkpointed and stopped on a signal; the exit code says which."""

    def __init__(self, code: int):
        super().__init__(code)


@dataclasses.dataclass
class Run:
    """Everything a run holds once it is set up."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    workdir: str
    data: Pipeline
    engine: engine_lib.Engine
    ckpt: checkpoint_lib.Checkpointer
    writer: Any  # metrics_lib.MetricsWriter on process 0, a writer of nothing elsewhere
    say: Any
    show_progress: bool
    lock: Any = None  # workdir_lock.WorkdirLock on process 0

    def check_lock(self) -> None:
        """Stops before writing if another run took the workdir over (a stale heartbeat)."""
        if self.lock is not None and self.lock.lost:
            raise ValueError(
                f"another run took over the lock of {self.workdir} (this run's heartbeat "
                "was stale); stopping without writing: run one job per workdir"
            )

    @property
    def end(self) -> int:
        t = self.train_cfg
        return min(t.stop_at_step or t.steps, t.steps)


# ------------------------------------------------------------------------ set-up


def open_workdir(workdir: str, config: dict, chief: bool, say=print):
    """Checks the workdir (and that every process sees the same one); on process 0 takes
    its lock and checks the experiment against the one recorded (it is recorded once the
    run is set up, in `run`)."""
    workdir_lib.check_writable(workdir)
    workdir_lib.check_shared(workdir)
    if not chief:
        return None
    lock = workdir_lock.WorkdirLock(workdir)
    lock.acquire()
    try:
        workdir_lib.check_config(workdir, config, say)
    except BaseException:
        lock.release()
        raise
    return lock


def build_data(model_cfg, train_cfg, data_cfg, workdir, rows, say, eval_rows=None) -> Pipeline:
    """This process's rows of the data (`rows` of a training batch, `eval_rows` of an eval
    batch), built by process 0 first (it may train the tokenizer or build the corpus into
    a shared place), then checked to be the same data on every process."""
    data = distributed.chief_first(
        "data",
        lambda: build_pipeline(
            model_cfg, train_cfg, data_cfg, workdir, rows, say, eval_rows=eval_rows
        ),
    )
    distributed.check_same(
        {"tokenizer sha256": data.tokenizer.sha256, "data sha256": data.fingerprint}
    )
    return data


def restore_or_init(r: Run) -> tuple[int, Any]:
    """(start step, state): the newest checkpoint that restores, or step 0 for a new run.

    A checkpoint directory whose every step fails raises checkpoint_lib.RestoreFailed:
    training from scratch over a run's checkpoints would let max_to_keep delete them.
    """
    restored = r.ckpt.restore_latest(r.engine.abstract_state())
    if restored is None:
        return 0, r.engine.init(jax.random.key(r.train_cfg.seed))
    start, ck_state, meta = restored
    sha = r.data.tokenizer.sha256
    if meta.get("tokenizer_sha256") != sha:
        raise ValueError(
            f"checkpoint step {start} in {r.ckpt.directory} was trained with tokenizer "
            f"{meta.get('tokenizer_sha256', '?')[:12]} but {r.data.tokenizer.path} is "
            f"{sha[:12]}; use that run's tokenizer or a new --workdir"
        )
    r.data.restore(meta["data"])
    r.say(f"resumed from checkpoint step {start} in {r.ckpt.directory}")
    return start, r.engine.from_checkpoint(ck_state)


# -------------------------------------------------------------------- evaluation


def evaluate(engine, state, eval_sets: dict) -> dict:
    """Held-out loss and bits per byte per source, and over all of them (byte-weighted).

    Each eval batch's NLL is summed over the unmasked targets of the whole global batch
    inside the program, so every host gets the total of every host's rows; the byte
    counts (UTF-8 bytes of the original text) are the global batch's, which every host
    reads alike.
    """
    out, total_nll, total_bytes, total_tokens = {}, 0.0, 0, 0
    for source, windows in eval_sets.items():
        nll_sum, tokens, num_bytes = 0.0, 0, 0
        for batch, mask, target_bytes in windows:
            s, n = engine.eval_sums(state, batch, mask)
            nll_sum, tokens, num_bytes = nll_sum + s, tokens + n, num_bytes + target_bytes
        out[f"heldout/{source}/bpb"] = metrics_lib.bits_per_byte(nll_sum, num_bytes)
        total_nll += nll_sum
        total_bytes += num_bytes
        total_tokens += tokens
    out["heldout_loss"] = total_nll / total_tokens
    out["heldout_bpb"] = metrics_lib.bits_per_byte(total_nll, total_bytes)
    return out


def run_eval(r: Run, step: int, state) -> dict:
    ev = evaluate(r.engine, state, r.data.eval_sets)
    record = {"step": step, "kind": "eval", "heldout_unigram_bpb": r.data.unigram_bpb, **ev}
    r.writer.write(record)
    per_source = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in ev.items() if k.count("/") == 2)
    r.say(
        f"step {step}: held-out {ev['heldout_bpb']:.3f} bits/byte "
        f"(unigram {r.data.unigram_bpb:.3f}; {per_source})"
    )
    return record


def _eval_rows(engine, train_cfg: TrainConfig) -> tuple[int, int]:
    """This process's rows of an eval batch; a one-line error if it does not split."""
    b, m = train_cfg.eval_batch_size, engine.batch_multiple
    if b % m:
        raise ValueError(
            f"--config.train.eval_batch_size={b} does not split over the {m} devices the "
            f"batch is split over; use --config.train.eval_batch_size={-(-b // m) * m}"
        )
    try:
        lo, hi = engine.local_rows(b)
    except ValueError as e:
        raise ValueError(f"--config.train.eval_batch_size={b}: {e}") from None
    if hi <= lo or (hi - lo) % jax.local_device_count() and "pmap" in engine.description:
        raise ValueError(
            f"--config.train.eval_batch_size={b} gives this process {hi - lo} rows, not a "
            f"multiple of its {jax.local_device_count()} devices; use a multiple of "
            f"{jax.device_count()}"
        )
    return lo, hi


# ---------------------------------------------------------------- the step loop


def train_steps(r: Run, start: int, state, stopper: Stopper, watchdog: Watchdog) -> dict:
    """Steps start+1 .. end; returns the last train and eval records and the state."""
    t, end = r.train_cfg, r.end
    log, saver = StepLog(r, start), Saver(r)
    rows = {b: r.engine.local_rows(b) for b in t.batch_sizes()}  # this process's, per B
    evals: dict = {}
    profiling = False
    saved, doing, step = start, "train", start  # the newest checkpoint; what the loop does
    try:
        for step in range(start + 1, end + 1):
            doing = "train"
            if t.profile_steps and step == t.profile_steps[0]:
                jax.profiler.start_trace(os.path.join(r.workdir, "profile"))
                profiling = True
            b = t.batch_size_at(step)
            batch = r.data.next_batch(b, rows[b])
            state, metrics = r.engine.train_step(state, batch, global_batch=b)
            log.hold(step, metrics)
            if _TEST_STEP_SLEEP_S:
                time.sleep(_TEST_STEP_SLEEP_S)
            if step in log.first_steps:  # may compile: read now, time from here on
                log.flush()
                log.restart_clock(step)
            watchdog.tick(step)
            log.bar.update(1)
            if profiling and step == t.profile_steps[1]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                profiling = False
                r.say(f"profile of steps {t.profile_steps} in {r.workdir}/profile")
            stop = stopper.reached(step)
            if saver.due(step) or stop:  # before the eval: a failing eval loses no training
                r.check_lock()
                log.flush()  # a diverged run stops before it saves
                log.exclude(saver.save(step, state, force=step == end or stop))
                saved = step
                # Kept heap blocks (gopher/host_memory.py) that a save's host copies left
                # unfit for the step: given back, so the heap cannot creep up.
                host_memory.release_freed_memory()
            if step % t.eval_every == 0 or step == end:
                log.flush()
                doing = "eval"
                evals = run_eval(r, step, state)
                host_memory.release_freed_memory()  # the eval program's too
                log.restart_clock(step)
            if stop:
                code = Stopper.exit_code(stop)
                r.say(f"{stop}: checkpointed step {step}; exiting with {code} (rerun to resume)")
                raise Stopped(code)
        log.flush()
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(step_oom_message(r, doing, step, saved, e)) from e
    finally:
        if profiling:
            jax.profiler.stop_trace()
        log.bar.close()
    result = {"train": log.last, "eval": evals, "unigram_bpb": r.data.unigram_bpb}
    if saver.block_times:
        result["checkpoint_block_s"] = float(np.mean(saver.block_times))
    result["state"] = state
    result["chief"] = jax.process_index() == 0
    return result


def _eval_missed(r: Run, start: int) -> bool:
    """Whether `start`, the step a run resumes from, is an eval step that metrics.jsonl
    holds no eval of. Process 0's answer on every process (the eval is collective)."""
    t = r.train_cfg
    if start == 0 or (start % t.eval_every and start != r.end):
        return False
    missed = False
    if jax.process_index() == 0:
        metrics = paths.resolve(paths.join(r.workdir, "metrics.jsonl"))
        text = metrics.read_text() if metrics.exists() else ""
        lines = (x for x in text.splitlines() if '"eval"' in x)
        missed = not any(_is_eval_of(line, start) for line in lines)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        missed = bool(multihost_utils.broadcast_one_to_all(np.int32(missed)))
    return missed


def _is_eval_of(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # a torn line
        return False
    return record.get("kind") == "eval" and record.get("step") == step


def _nothing_to_train(r: Run, start: int) -> str | None:
    """The line for a run already at (or past) its last step, else None."""
    if start < r.end:
        return None
    t = r.train_cfg
    field = "stop_at_step" if t.stop_at_step and t.stop_at_step < t.steps else "steps"
    return (
        f"already at step {start} >= {field} {r.end}; nothing to train "
        f"(raise --config.train.{field})"
    )


def _config_record(model_cfg, train_cfg, data_cfg, parallel) -> dict:
    return {
        "model": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg),
        "data": dataclasses.asdict(data_cfg),
        "parallel": dataclasses.asdict(parallel),
    }


def run(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    workdir: str,
    parallel: ParallelConfig | None = None,
    show_progress: bool = True,
) -> dict:
    """Trains (or resumes) to train_cfg.steps; returns the last train and eval metrics."""
    # One spelling of the workdir for every file under it: the shell leaves --workdir=~/x
    # unexpanded, and os.path.join would put the data or the profile under ./~/x.
    workdir = str(paths.resolve(workdir))
    parallel = parallel or ParallelConfig(data=1)
    chief = jax.process_index() == 0
    show_progress = show_progress and chief
    say = (tqdm.write if show_progress else print) if chief else (lambda *a, **k: None)
    config = _config_record(model_cfg, train_cfg, data_cfg, parallel)
    lock = open_workdir(workdir, config, chief, say)
    writer = ckpt = None
    try:
        engine = engine_lib.build(model_cfg, train_cfg, parallel)
        rows = engine.local_rows(train_cfg.batch_size)
        data = build_data(
            model_cfg, train_cfg, data_cfg, workdir, rows, say, _eval_rows(engine, train_cfg)
        )
        say(data.summary)
        if chief:  # moved data is fine (data.paths may change), other data is not
            workdir_lib.check_data(workdir, config, data.fingerprint)
        say(
            f"model: {model_cfg.name}, {model_cfg.param_count_formula():,} params; "
            f"{engine.description}"
        )
        for note in engine.notes:
            say(f"sharding: {note}")
        check_memory(engine, model_cfg, train_cfg, say)
        directory = checkpoint_lib.checkpoint_directory(workdir, train_cfg.restart_from_scratch)
        ckpt = checkpoint_lib.Checkpointer(
            directory, max_to_keep=train_cfg.max_to_keep, async_save=train_cfg.async_checkpoint
        )
        writer = (
            metrics_lib.MetricsWriter(workdir, tensorboard=train_cfg.tensorboard)
            if chief
            else metrics_lib.NullWriter()
        )
        r = Run(model_cfg, train_cfg, workdir, data, engine, ckpt, writer, say, show_progress, lock)
        start, state = restore_or_init(r)
        # The step resumed from was checkpointed before its eval, which then did not run
        # (killed, out of memory): run it now, or the record is lost for good (the last
        # step's above all, whose rerun would have nothing to train).
        missed = run_eval(r, start, state) if _eval_missed(r, start) else {}
        nothing = _nothing_to_train(r, start)
        if nothing:
            say(nothing)
            return {
                "train": {},
                "eval": missed,
                "unigram_bpb": data.unigram_bpb,
                "state": state,
                "chief": chief,
            }
        if chief:  # set up: the experiment is recorded only now
            workdir_lib.record_config(
                workdir,
                config,
                data_sha256=data.fingerprint,
                replace_untrained=True,
                heldout_sha256=data.heldout_sha256 or None,
            )
        if start == 0:
            writer.write({"step": 0, "kind": "baseline", "heldout_unigram_bpb": data.unigram_bpb})
        with Stopper() as stopper, Watchdog(train_cfg.watchdog_s) as watchdog:
            return train_steps(r, start, state, stopper, watchdog)
    except jax.errors.JaxRuntimeError as e:  # the steps' own say which step ran out
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(setup_oom_message(e)) from e
    finally:
        _close(writer, ckpt, lock, say)


def _close(writer, ckpt, lock, say) -> None:
    """Each part closed on its own: a failure warns and never replaces the error or exit
    status that stopped the run (75 on preemption), nor skips the rest. The checkpointer
    first (it waits for a save in flight), the lock last (its holder writes until then)."""
    parts = (
        ("checkpointer", ckpt, "close"),
        ("metrics", writer, "close"),
        ("workdir lock", lock, "release"),
    )
    for name, part, method in parts:
        if part is None:
            continue
        try:
            getattr(part, method)()
        except Exception as e:  # e.g. a full disk, the storage gone: the run's error matters
            say(f"warning: closing the {name} failed: {str(e)[:200]}")
