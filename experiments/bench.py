"""Train-step speed: tokens/s, MFU and compile time of the real, jitted train step.

    python -m experiments.bench --shape=nanogpt
    python -m experiments.bench --preset=tiny --precision=mixed --remat=full --steps=20
    python -m experiments.bench --shape=nanogpt --peer=torch        # ~10 min on 2 cores

Single run (no --peer): builds the train step with `gopher.train.make_train_functions`,
jits it with the state donated (as the host loop does), traces and compiles it ahead of
time (`compile_s`), warms up, then times `--steps` steps one by one (blocking on each):
`tokens_per_sec` is from the median step. On a shared machine `step_cpu_s` (CPU seconds
per step, all threads) is the steadier number. `mfu` is tokens/s x model FLOPs per token
(6 N + 12 L H Q T, gopher/metrics.py) over the peak FLOP/s of the one device the step runs
on (--peak_gflops, else the device table, else on CPU a measured fp32 matmul: the figure
the training loop uses). `peak_rss_gib` is the process's ru_maxrss; on GPU / TPU
`device_peak_gib` is the device allocator's peak, and `temp_gib` is XLA's temporaries for
the step. --attention overrides the preset's attention path (xla, pallas, pallas_fused, cudnn);
--profile=DIR traces 2 more steps with jax.profiler after the timed ones and adds their
kernels, summed by name (experiments/trace_summary.py), as `profile`. Prints one JSON line
and appends it, with the command line, to --out (`benchmarks/train_speed.jsonl`).

Side by side (--peer=torch): experiments/bench_peer.py runs this module in single-run mode
and the PyTorch GPT-2 of benchmarks/peers/ (eager, then compiled) in turn, --rounds times,
each in its own process; prints both sides' tokens/s, MFU, peak memory and their ratio, and
writes everything to --peer_out (`benchmarks/bench_<shape>_peer.json`, overwritten) and appends
the sitting's one-line summary to `benchmarks/bench_<shape>_peer_sittings.jsonl` (kept).

Shapes:
  nanogpt  the 44m row (8 layers, d_model 512, 16 heads, key 32, vocab 32000) at
           seq 512, batch 8: the shape nanoGPT on PyTorch and Haiku's example LM
           were timed at on the same machine (~620-650 and ~530 tokens/s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time

from absl import app, flags

from experiments import bench_peer, common
from experiments.bench_machine import git_revision, machine_record, peak_rss_gib
from gopher import config as config_lib

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
_ATTENTION = flags.DEFINE_enum(
    "attention",
    None,
    list(config_lib.ATTENTIONS),
    "Attention path (default: the preset's).",
)
_PROFILE = flags.DEFINE_string(
    "profile", None, "Also trace 2 steps with jax.profiler into this folder and summarise them."
)
_UNROLL = flags.DEFINE_enum(
    "unroll_layers", None, ["auto", "yes", "no"], "Unroll the layer loop (default: the config's)."
)
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default 10; 5 with --peer).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_PEAK_GFLOPS = flags.DEFINE_float(
    "peak_gflops", 0.0, "Peak GFLOP/s for MFU (0: the device table, or on CPU a measured matmul)."
)
_OUT = flags.DEFINE_string("out", "benchmarks/train_speed.jsonl", "Where to append the result.")
_NOTE = flags.DEFINE_string("note", "", "Free text stored with the result (what was measured).")
_PEER = flags.DEFINE_enum(
    "peer", None, list(bench_peer.PEER_SCRIPTS), "Also time this peer, side by side."
)
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", None, "Interpreter with torch for the peer (default: this one)."
)
_ROUNDS = flags.DEFINE_integer("rounds", 3, "With --peer: gopher, eager, compiled, this often.")
_PEER_OUT = flags.DEFINE_string(
    "peer_out", None, "With --peer: the JSON written (default benchmarks/bench_<shape>_peer.json)."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


# ----------------------------------------------------------------------- single run


def configs(shape=None, preset=None, seq_len=None, batch=None, attention=None):
    """(name, ModelConfig, TrainConfig) of a named shape or a preset (default `tiny`)."""
    if shape and preset:
        raise ValueError(f"--shape={shape} and --preset={preset} both given; pass one of them")
    if shape:
        name, (preset, overrides, default_batch) = shape, SHAPES[shape]
    else:
        name, preset, overrides, default_batch = preset or "tiny", preset or "tiny", {}, 8
    model_cfg = config_lib.get_preset(preset).replace(**overrides)
    if seq_len:
        model_cfg = model_cfg.replace(seq_len=seq_len)
    if attention:
        model_cfg = model_cfg.replace(attention=attention)
    train_cfg = config_lib.TrainConfig(
        steps=1000, batch_size=batch or default_batch, warmup_steps=10
    )
    return name, model_cfg, train_cfg


def peak_flops(peak_gflops: float = 0.0) -> tuple[float | None, str]:
    """Peak FLOP/s of the one device the bench's step runs on, and where it came from.

    The training loop's rule (gopher.step_log.peak_flops) for a single device: the user's
    figure, else the device table, else on CPU the measured matmul peak of the host
    (whose cores the one CPU device uses). loop's version multiplies by the device
    count, which a one-device step must not."""
    import jax

    from gopher import metrics as metrics_lib

    if peak_gflops:
        return peak_gflops * 1e9, "--peak_gflops"
    device = jax.devices()[0]
    peak = metrics_lib.device_peak_flops(device)
    if peak is not None:
        return peak, device.device_kind
    if device.platform == "cpu":
        return metrics_lib.measure_cpu_peak_flops(), "measured fp32 matmul (jax)"
    return None, "unknown (pass --peak_gflops)"


def single_run(
    name,
    model_cfg,
    train_cfg,
    precision="fp32",
    remat="none",
    steps=10,
    warmup=2,
    peak_gflops=0.0,
    profile=None,
) -> dict:
    """Times the jitted train step; the record `experiments.bench` prints."""
    import jax
    import jax.numpy as jnp

    from gopher import engine as engine_lib
    from gopher import metrics as metrics_lib
    from gopher import train as train_lib

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} --warmup={warmup}; pass --steps>=1 and --warmup>=0")
    b, t = train_cfg.batch_size, model_cfg.seq_len
    fns = train_lib.make_train_functions(model_cfg, train_cfg, precision, remat)
    state = jax.jit(fns.init)(jax.random.key(train_cfg.seed))
    tokens = jax.random.randint(jax.random.key(1), (b, t + 1), 0, model_cfg.vocab_size, jnp.int32)

    step = jax.jit(fns.train_step, donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    compile_s = time.perf_counter() - start
    engine_lib.release_freed_host_memory()  # as the training loop does after compiling

    for _ in range(warmup):
        state, metrics = compiled(state, tokens)
    jax.block_until_ready(state)
    times = []
    cpu_start = time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, tokens)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    cpu_per_step = (time.process_time() - cpu_start) / steps
    profile_summary = None
    if profile:  # after the timed steps, so tracing never slows them
        from experiments import trace_summary

        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for _ in range(2):
                state, metrics = compiled(state, tokens)
            jax.block_until_ready((state, metrics))
        profile_summary = trace_summary.summarize(profile, top=15)
        print(trace_summary.format_summary(profile_summary), file=sys.stderr)
    memory = jax.devices()[0].memory_stats() or {}  # None on CPU
    step_s = statistics.median(times)
    tokens_per_sec = b * t / step_s
    flops_token = metrics_lib.flops_per_token(model_cfg, t)
    peak, peak_source = peak_flops(peak_gflops)
    mfu = metrics_lib.mfu(tokens_per_sec, flops_token, peak)

    return {
        "shape": name,
        "preset": model_cfg.name,
        "layers": model_cfg.num_layers,
        "heads": model_cfg.num_heads,
        "key_size": model_cfg.key_size,
        "d_model": model_cfg.d_model,
        "vocab": model_cfg.vocab_size,
        "seq_len": t,
        "batch": b,
        "precision": precision,
        "remat": remat,
        "unroll_layers": train_cfg.unroll_layers,
        "steps": steps,
        "warmup": warmup,
        "tokens_per_sec": round(tokens_per_sec, 1),
        "step_time_s": round(step_s, 4),
        "step_time_min_s": round(min(times), 4),
        # CPU seconds (all threads) per step: steadier than wall time on a shared machine.
        "step_cpu_s": round(cpu_per_step, 3),
        "compile_s": round(compile_s, 2),
        "loss": round(float(metrics["loss"]), 4),
        "flops_per_token": flops_token,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_rss_gib": peak_rss_gib(),
        "attention": model_cfg.attention,
        "device_peak_gib": round(memory["peak_bytes_in_use"] / 2**30, 3)
        if "peak_bytes_in_use" in memory
        else None,
        "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3),
        "profile": profile_summary,
        "jax": jax.__version__,
        "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "machine": machine_record(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git": git_revision(),
    }


# ----------------------------------------------------------------------- side by side


def main(argv):
    del argv
    steps, warmup = _STEPS.value, _WARMUP.value
    with common.user_errors(_VERBOSE.value):
        name, model_cfg, train_cfg = configs(
            _SHAPE.value, _PRESET.value, _SEQ_LEN.value, _BATCH.value, _ATTENTION.value
        )
        if _UNROLL.value:
            train_cfg = dataclasses.replace(train_cfg, unroll_layers=_UNROLL.value)
        if _PEER.value:
            opts = bench_peer.PeerOptions(
                peer=_PEER.value,
                named_shape=bool(_SHAPE.value),
                precision=_PRECISION.value,
                remat=_REMAT.value,
                rounds=_ROUNDS.value,
                peer_python=_PEER_PYTHON.value,
                out=_PEER_OUT.value,
                peak_gflops=_PEAK_GFLOPS.value,
                note=_NOTE.value,
            )
            steps = 5 if steps is None else steps
            bench_peer.side_by_side(opts, name, model_cfg, train_cfg, steps, warmup)
            return 0
        steps = 10 if steps is None else steps
        result = single_run(
            name,
            model_cfg,
            train_cfg,
            _PRECISION.value,
            _REMAT.value,
            steps,
            warmup,
            _PEAK_GFLOPS.value,
            _PROFILE.value,
        )
    result["note"] = _NOTE.value
    print(json.dumps(result))
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        command = "python -m experiments.bench " + shlex.join(sys.argv[1:])
        with open(_OUT.value, "a") as f:
            f.write(json.dumps({**result, "command": command}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
