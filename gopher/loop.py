"""The host loop: data, the parallel engine, progress, metrics, eval and checkpoints.

Side effects live here (files, clocks, signals, progress bars); the numerics are the
pure functions of gopher/train.py behind an Engine (gopher/engine.py). Like nanodo,
the loop dispatches step N before it reads step N-1's metrics, so reading them does
not stall the device.

A run in an existing workdir resumes from its newest good checkpoint and appends to
metrics.jsonl; the steps redone after that checkpoint are logged again with the same
values. SIGTERM (a TPU VM preemption) checkpoints and exits with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import jax
import numpy as np
from tqdm import tqdm

from gopher import checkpoint as checkpoint_lib
from gopher import engine as engine_lib
from gopher import metrics as metrics_lib
from gopher import workdir as workdir_lib
from gopher.config import DataConfig, ModelConfig, ParallelConfig, TrainConfig
from gopher.data.pipeline import build_pipeline

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again": restart the same command to resume
DIVERGED_EXIT_CODE = 3  # too many consecutive non-finite steps


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


class Diverged(RuntimeError):
    pass


def evaluate(engine, state, eval_sets: dict) -> dict:
    """Held-out loss and bits per byte per source, and over all of them (byte-weighted)."""
    out, total_nll, total_bytes, total_tokens = {}, 0.0, 0, 0
    for source, windows in eval_sets.items():
        nll_sum, tokens, num_bytes = 0.0, 0, 0
        for batch, target_bytes in windows:
            nll = engine.eval_nll(state, batch).astype(np.float64)
            nll_sum += float(nll.sum())
            tokens += nll.size
            num_bytes += target_bytes
        out[f"heldout/{source}/bpb"] = metrics_lib.bits_per_byte(nll_sum, num_bytes)
        total_nll, total_bytes, total_tokens = (
            total_nll + nll_sum,
            total_bytes + num_bytes,
            total_tokens + tokens,
        )
    out["heldout_loss"] = total_nll / total_tokens
    out["heldout_bpb"] = metrics_lib.bits_per_byte(total_nll, total_bytes)
    return out


def _peak_flops(train_cfg: TrainConfig) -> tuple[float | None, str]:
    dev = jax.devices()[0]
    peak = metrics_lib.peak_flops_per_device(dev.device_kind, train_cfg.peak_flops)
    if peak is not None:
        return peak * jax.device_count(), "configured" if train_cfg.peak_flops else dev.device_kind
    if dev.platform == "cpu":
        # Simulated CPU devices share the host's cores: the host's matmul peak is the total.
        return metrics_lib.measure_cpu_peak_flops(), "measured CPU matmul"
    return None, "unknown (set --config.train.peak_flops)"


def check_memory(engine, model_cfg: ModelConfig, train_cfg: TrainConfig, say) -> None:
    """Compiles the step ahead of time and refuses to start one that cannot fit."""
    b, t = train_cfg.batch_size, model_cfg.seq_len
    mem = engine.precompile((b, t + 1))
    if not mem:
        return
    need = mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]
    have = engine_lib.available_bytes_per_device()
    gib = 2.0**30
    say(f"step memory per device: {need / gib:.2f} GiB (temp {mem['temp'] / gib:.2f} GiB)")
    if have is not None and need > have:
        raise ValueError(
            f"seq_len {t} x batch {b} needs {need / gib:.1f} GiB per device for the train "
            f"step but {have / gib:.1f} GiB is available; lower --config.model.seq_len or "
            f"--config.train.batch_size, use --config.train.remat=full, or add devices"
        )


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    workdir: str,
    parallel: ParallelConfig | None = None,
    show_progress: bool = True,
) -> dict:
    """Trains (or resumes) to train_cfg.steps; returns the last train and eval metrics."""
    parallel = parallel or ParallelConfig(data=1)
    workdir_lib.check_writable(workdir)
    workdir_lib.record_config(
        workdir,
        {
            "model": dataclasses.asdict(model_cfg),
            "train": dataclasses.asdict(train_cfg),
            "data": dataclasses.asdict(data_cfg),
            "parallel": dataclasses.asdict(parallel),
        },
    )
    say = tqdm.write if show_progress else print
    local_batch = train_cfg.batch_size // jax.process_count()
    data = build_pipeline(model_cfg, train_cfg, data_cfg, workdir, local_batch, say)
    say(data.summary)
    engine = engine_lib.build(model_cfg, train_cfg, parallel)
    say(
        f"model: {model_cfg.name}, {model_cfg.param_count_formula():,} params; {engine.description}"
    )

    check_memory(engine, model_cfg, train_cfg, say)

    ckpt = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=train_cfg.max_to_keep,
        async_save=train_cfg.async_checkpoint,
    )
    restored = ckpt.restore_latest(engine.abstract_state())
    if restored is not None:
        start, ck_state, meta = restored
        if meta.get("tokenizer_sha256") != data.tokenizer.sha256:
            raise ValueError(
                f"checkpoint step {start} in {ckpt.directory} was trained with tokenizer "
                f"{meta.get('tokenizer_sha256', '?')[:12]} but {data.tokenizer.path} is "
                f"{data.tokenizer.sha256[:12]}; use that run's tokenizer or a new --workdir"
            )
        state = engine.from_checkpoint(ck_state)
        data.restore(meta["data"])
        say(f"resumed from checkpoint step {start} in {ckpt.directory}")
    else:
        start = 0
        state = engine.init(jax.random.key(train_cfg.seed))

    writer = metrics_lib.MetricsWriter(workdir, tensorboard=train_cfg.tensorboard)
    if start == 0:
        writer.write({"step": 0, "kind": "baseline", "heldout_unigram_bpb": data.unigram_bpb})
    b, t = train_cfg.batch_size, model_cfg.seq_len
    flops_token = metrics_lib.flops_per_token(model_cfg, t)
    flops_token_causal = metrics_lib.flops_per_token(model_cfg, t, causal=True)
    peak, peak_source = _peak_flops(train_cfg)

    def meta(step):
        return {
            "step": step,
            "data": data.state(),
            "tokenizer_sha256": data.tokenizer.sha256,
            "model": dataclasses.asdict(model_cfg),
        }

    def save(step, state, force=False):
        t0 = time.perf_counter()
        try:
            saved = ckpt.save(step, engine.to_checkpoint(state), meta(step), force=force)
            if force:
                ckpt.wait()
        except Exception as e:  # Orbax reports a full disk as OSError or RESOURCE_EXHAUSTED
            text = str(e)
            if (
                not isinstance(e, OSError)
                and "No space left" not in text
                and "EXHAUSTED" not in text
            ):
                raise
            raise ValueError(
                f"checkpoint step {step} could not be written to {ckpt.directory} "
                f"({'no space left on device' if 'space' in text else text[:120]}); free disk "
                f"space and restart: the previous checkpoint is intact"
            ) from None
        return saved, time.perf_counter() - t0

    end = min(train_cfg.stop_at_step or train_cfg.steps, train_cfg.steps)
    result = {"train": {}, "eval": {}, "unigram_bpb": data.unigram_bpb}
    clock = {"step": start, "time": time.perf_counter()}
    prev = None  # (step, metrics on device) of the previous step, read one step late
    bad_run = 0
    block_times: list[float] = []
    profiling = False
    bar = tqdm(total=train_cfg.steps, initial=start, disable=not show_progress, dynamic_ncols=True)

    def read(step, metrics):
        """Reads step's metrics (it has finished by now); logs every log_every steps."""
        nonlocal bad_run
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
        finite = math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])
        bad_run = 0 if finite else bad_run + 1
        if not finite:
            say(
                f"step {step}: non-finite loss {rec['loss']} / grad norm {rec['grad_norm']}; "
                f"update skipped ({int(rec['skipped'])} skipped so far)"
            )
        if bad_run >= train_cfg.max_bad_steps:
            raise Diverged(
                f"{bad_run} consecutive steps (to step {step}) had a non-finite loss or "
                f"gradient norm; stopping. The last good checkpoint in {ckpt.directory} is "
                f"intact; lower --config.train.max_lr or check the data"
            )
        if step % train_cfg.log_every and step != end:
            return
        now = time.perf_counter()
        tps = b * t * (step - clock["step"]) / max(now - clock["time"], 1e-9)
        clock.update(step=step, time=now)
        rec.update(step=step, kind="train", tokens_per_sec=tps)
        if step - 1 == start:  # includes compilation: not a speed measurement
            rec["tokens_per_sec"] = float("nan")
        else:
            rec["mfu"] = metrics_lib.mfu(tps, flops_token, peak)
            rec["mfu_causal"] = metrics_lib.mfu(tps, flops_token_causal, peak)
            rec["step_time_s"] = b * t / max(tps, 1e-9)
        rec["bpt"] = rec["loss"] / math.log(2)  # bits per token
        rec.update(data.stats())
        writer.write({k: v for k, v in rec.items() if v is not None})
        result["train"] = rec
        bar.set_postfix(
            loss=f"{rec['loss']:.3f}",
            tok_s=f"{tps:,.0f}",
            mfu=f"{(rec.get('mfu') or 0) * 100:.1f}%",
        )

    say(f"MFU peak: {peak / 1e12 if peak else float('nan'):.2f} TFLOP/s ({peak_source})")
    try:
        with _SigtermFlag() as sigterm:
            for step in range(start + 1, end + 1):
                if train_cfg.profile_steps and step == train_cfg.profile_steps[0]:
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
                    profiling = True
                batch = data.next_batch()
                state, metrics = engine.train_step(state, batch)
                if prev is not None:
                    read(*prev)
                prev = (step, metrics)
                if step == start + 1:
                    read(*prev)
                    prev = None
                    clock.update(step=step, time=time.perf_counter())
                bar.update(1)
                if profiling and step == train_cfg.profile_steps[1]:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                    profiling = False
                    say(f"profile of steps {train_cfg.profile_steps} in {workdir}/profile")
                last = step == end
                if step % train_cfg.eval_every == 0 or last:
                    if prev is not None:
                        read(*prev)
                        prev = None
                    ev = evaluate(engine, state, data.eval_sets)
                    result["eval"] = {
                        "step": step,
                        "kind": "eval",
                        "heldout_unigram_bpb": data.unigram_bpb,
                        **ev,
                    }
                    writer.write(result["eval"])
                    per_source = ", ".join(
                        f"{k.split('/')[1]} {v:.3f}" for k, v in ev.items() if k.count("/") == 2
                    )
                    say(
                        f"step {step}: held-out {ev['heldout_bpb']:.3f} bits/byte "
                        f"(unigram {data.unigram_bpb:.3f}; {per_source})"
                    )
                    clock.update(step=step, time=time.perf_counter())
                if step % train_cfg.checkpoint_every == 0 or last or sigterm.raised:
                    if prev is not None:  # a diverged run stops before it saves
                        read(*prev)
                        prev = None
                    _, blocked = save(step, state, force=last or sigterm.raised)
                    if not (last or sigterm.raised):
                        block_times.append(blocked)
                    clock["time"] += blocked
                if sigterm.raised:
                    say(f"SIGTERM: checkpointed step {step}; exiting with {PREEMPTED_EXIT_CODE}")
                    raise Preempted()
            if prev is not None:
                read(*prev)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        bar.close()
        writer.close()
        try:
            ckpt.close()
        except Exception as e:  # e.g. a full disk: the error that stopped the run matters
            say(f"warning: closing the checkpointer failed: {str(e)[:200]}")
    if block_times:
        result["checkpoint_block_s"] = float(np.mean(block_times))
    result["state"] = state
    return result
