"""Device memory of a run's steps: refuse a run that cannot fit, name what to lower.

A step that does not fit would otherwise fail at run time with a long XLA error: the
train step at its first step, the eval step only at the first eval, after hours of
training. So before the first step the loop compiles the train step ahead of time at
every batch size the run uses (a batch schedule's too) and the eval step at
eval_batch_size, reads the bytes each needs per device from the compiled program, and
refuses with one line when one cannot fit: for the eval step, naming the eval_batch_size
that would (memory is affine in the rows, so two compiles give the slope).

What the compiled sizes miss (fragmentation, another process on the device, a backend
that reports no sizes) can still run out at run time. XLA reports it as a long RESOURCE_EXHAUSTED error; the loop turns it into
a one-line OutOfMemory (a ValueError: the CLI exits 2) that says which step ran out, what
to lower, and which checkpoint is intact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from gopher import engine as engine_lib
from gopher.config import ModelConfig, TrainConfig

if TYPE_CHECKING:
    from gopher.loop import Run

_GIB = 2.0**30


class OutOfMemory(ValueError):
    """A step ran out of device memory: one line naming what to lower (CLI exit 2)."""


def is_out_of_memory(e: BaseException) -> bool:
    """An XLA runtime error for memory that ran out (RESOURCE_EXHAUSTED on an accelerator;
    "Out of memory allocating N bytes" from XLA CPU, labelled INTERNAL)."""
    if not isinstance(e, jax.errors.JaxRuntimeError):
        return False
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


# ------------------------------------------------------------ before the first step


def _need(mem: dict) -> int:
    """Bytes per device a compiled step needs (its own and the state left resident)."""
    return mem["temp"] + mem["argument"] + mem["output"] - mem["alias"] + mem.get("resident", 0)


def check_memory(engine, model_cfg: ModelConfig, train_cfg: TrainConfig, say) -> None:
    """Compiles the train step ahead of time for every batch size the run uses (a batch
    schedule's too) and the eval step at eval_batch_size, and refuses to start a run
    whose steps cannot fit."""
    t = model_cfg.seq_len
    have = engine_lib.available_bytes_per_device()
    for b in train_cfg.batch_sizes():
        mem = engine.precompile((b, t + 1))
        if not mem:
            continue
        need = _need(mem)
        say(
            f"step memory per device at batch {b}: {need / _GIB:.2f} GiB "
            f"(temp {mem['temp'] / _GIB:.2f} GiB)"
        )
        if have is not None and need > have:
            raise ValueError(
                f"seq_len {t} x batch {b} needs {need / _GIB:.1f} GiB per device for the train "
                f"step but {have / _GIB:.1f} GiB is available; lower --config.model.seq_len or "
                f"the batch, use --config.train.remat=full, or add devices"
            )
    eb = train_cfg.eval_batch_size
    mem = engine.precompile_eval((eb, t + 1))
    if not mem:
        return
    need = _need(mem)
    say(f"eval memory per device at batch {eb}: {need / _GIB:.2f} GiB")
    if have is not None and need > have:
        raise ValueError(
            f"--config.train.eval_batch_size={eb} needs {need / _GIB:.1f} GiB per device for "
            f"the eval step at seq_len {t} but {have / _GIB:.1f} GiB is available; "
            + _eval_fit(engine, eb, t, need, have)
        )


def _eval_fit(engine, eb: int, t: int, need: int, have: int) -> str:
    """The fix for an eval batch that does not fit: a smaller eval_batch_size that does
    (memory is affine in the rows: measured at the smallest batch the mesh takes too)."""
    m = max(1, engine.batch_multiple)
    small = engine.precompile_eval((m, t + 1)) if eb > m else None
    if not small or _need(small) > have:
        return (
            f"even --config.train.eval_batch_size={m} does not fit: lower "
            "--config.model.seq_len or add devices"
        )
    per_row = (need - _need(small)) / (eb - m)
    rows = m + int((0.9 * have - _need(small)) / per_row) if per_row > 0 else m
    fit = max(m, min(eb - m, rows) // m * m)
    return f"use --config.train.eval_batch_size={fit} (or less)"


# ------------------------------------------------------------- when a step runs out


def step_oom_message(r: Run, doing: str, step: int, saved: int, e: BaseException) -> str:
    """The line for a train or eval step (`doing`) that ran out at `step`, naming the
    newest checkpoint (`saved`, 0 for none) that a rerun resumes from."""
    t, seq = r.train_cfg, r.model_cfg.seq_len
    kept = (
        f"checkpoint step {saved} in {r.ckpt.directory} is intact"
        + (" (rerun to resume)" if saved < r.end else "")
        if saved
        else "no checkpoint was written yet"
    )
    if doing == "eval":
        return (
            f"out of device memory in the held-out eval at step {step} "
            f"(--config.train.eval_batch_size={t.eval_batch_size} x seq_len {seq}: "
            f"{_first_line(e, 100)}); lower --config.train.eval_batch_size; {kept}"
        )
    return (
        f"out of device memory in train step {step} (batch {t.batch_size_at(step)} x seq_len "
        f"{seq}: {_first_line(e, 100)}); lower --config.train.batch_size or "
        "--config.model.seq_len, raise --config.train.microbatches or use "
        f"--config.train.remat=full; {kept}"
    )


def setup_oom_message(e: BaseException, where: str = " setting the run up") -> str:
    """The line for memory that ran out outside a step (`where`: before the step loop,
    compiling, restoring, a missed eval; "" where the caller cannot tell): which size
    was too big is not known, so it names each."""
    return (
        f"out of device memory{where} ({_first_line(e)}); lower "
        "--config.train.batch_size, --config.train.eval_batch_size or "
        "--config.model.seq_len, or use --config.train.remat=full"
    )
