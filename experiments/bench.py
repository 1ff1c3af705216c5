"""Train-step speed: tokens/s and compile time of the real, jitted train step.

    python -m experiments.bench --shape=nanogpt
    python -m experiments.bench --preset=tiny --precision=mixed --remat=full --steps=20

Builds the train step with `gopher.train.make_train_functions`, jits it with the
state donated (as the host loop does), traces and compiles it ahead of time
(`compile_s`), warms up, then times `--steps` steps one by one (blocking on each):
`tokens_per_sec` is from the median step. On a shared machine `step_cpu_s` (CPU
seconds per step, all threads) is the steadier number. Prints one JSON line and
appends it, with the command line, to `benchmarks/train_speed.jsonl`.

Shapes:
  nanogpt  the 44m row (8 layers, d_model 512, 16 heads, key 32, vocab 32000) at
           seq 512, batch 8: the shape nanoGPT on PyTorch and Haiku's example LM
           were timed at on the same machine (~620-650 and ~530 tokens/s on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from gopher import config as config_lib
from gopher import train as train_lib

SHAPES = {
    # name: (preset, overrides, batch)
    "nanogpt": ("44m", {"seq_len": 512}, 8),
}

_SHAPE = flags.DEFINE_enum("shape", None, list(SHAPES), "A named benchmark shape.")
_PRESET = flags.DEFINE_string("preset", None, "Model preset (gopher/config.py PRESETS).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the shape's).")
_BATCH = flags.DEFINE_integer("batch", None, "Sequences per step (default: the shape's).")
_PRECISION = flags.DEFINE_string("precision", "fp32", "fp32 | mixed | bf16 | bf16_sr | ...")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy name (gopher.model.REMAT_POLICIES).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_OUT = flags.DEFINE_string("out", "benchmarks/train_speed.jsonl", "Where to append the result.")
_NOTE = flags.DEFINE_string("note", "", "Free text stored with the result (what was measured).")


def _configs():
    if _SHAPE.value and _PRESET.value:
        raise app.UsageError("give --shape or --preset, not both")
    if _SHAPE.value:
        preset, overrides, batch = SHAPES[_SHAPE.value]
        name = _SHAPE.value
    else:
        preset, overrides, batch = _PRESET.value or "tiny", {}, 8
        name = preset
    model_cfg = config_lib.get_preset(preset).replace(**overrides)
    if _SEQ_LEN.value:
        model_cfg = model_cfg.replace(seq_len=_SEQ_LEN.value)
    batch = _BATCH.value or batch
    train_cfg = config_lib.TrainConfig(steps=1000, batch_size=batch, warmup_steps=10)
    return name, model_cfg, train_cfg


def _git_revision() -> str:
    """HEAD's short hash, with '+dirty' when tracked files differ from it ('' outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def main(argv):
    del argv
    name, model_cfg, train_cfg = _configs()
    b, t = train_cfg.batch_size, model_cfg.seq_len
    fns = train_lib.make_train_functions(model_cfg, train_cfg, _PRECISION.value, _REMAT.value)
    state = jax.jit(fns.init)(jax.random.key(train_cfg.seed))
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0, model_cfg.vocab_size, jnp.int32)

    step = jax.jit(fns.train_step, donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compile_s = time.perf_counter() - start

    for _ in range(_WARMUP.value):
        state, metrics = compiled(state, tokens)
    jax.block_until_ready(state)
    times = []
    cpu_start = time.process_time()
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = compiled(state, tokens)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    cpu_per_step = (time.process_time() - cpu_start) / _STEPS.value
    step_s = statistics.median(times)

    result = {
        "shape": name,
        "preset": model_cfg.name,
        "seq_len": t,
        "batch": b,
        "precision": _PRECISION.value,
        "remat": _REMAT.value,
        "steps": _STEPS.value,
        "tokens_per_sec": round(b * t / step_s, 1),
        "step_time_s": round(step_s, 4),
        "step_time_min_s": round(min(times), 4),
        # CPU seconds (all threads) per step: steadier than wall time on a shared machine.
        "step_cpu_s": round(cpu_per_step, 3),
        "compile_s": round(compile_s, 2),
        "loss": round(float(metrics["loss"]), 4),
        "jax": jax.__version__,
        "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git": _git_revision(),
        "note": _NOTE.value,
    }
    print(json.dumps(result))
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        command = "python -m experiments.bench " + shlex.join(sys.argv[1:])
        with open(_OUT.value, "a") as f:
            f.write(json.dumps({**result, "command": command}) + "\n")


if __name__ == "__main__":
    app.run(main)
