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

from experiments import bench_peer, common, devices
from experiments.bench_machine import git_revision, machine_record, peak_rss_gib
from gopher import config as config_lib
from gopher import cpu_kernels

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
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "D,M: run the step jitted over a (data D, model M) mesh of the first D*M devices, as "
    "training does (on CPU, D*M simulated devices); default: one device.",
)
_ZERO = flags.DEFINE_enum(
    "zero", "0", ["0", "1", "3"], "With --mesh: optimiser-state partitioning (1) or FSDP (3)."
)
_MICROBATCHES = flags.DEFINE_integer("microbatches", 1, "Gradient-accumulation microbatches.")
_STEPS = flags.DEFINE_integer("steps", None, "Timed steps (default 10; 5 with --peer).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_PEAK_GFLOPS = flags.DEFINE_float(
    "peak_gflops",
    0.0,
    "Peak GFLOP/s of one device for MFU (0: the device table, or on CPU a measured matmul; "
    "simulated CPU devices share their host's peak).",
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
    for flag, value in (("seq_len", seq_len), ("batch", batch)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag}={value}; pass a positive --{flag} (or leave it out)")
    model_cfg = config_lib.get_preset(preset).replace(**overrides)
    if seq_len is not None:
        model_cfg = model_cfg.replace(seq_len=seq_len)
    if attention:
        model_cfg = model_cfg.replace(attention=attention)
    train_cfg = config_lib.TrainConfig(
        steps=1000, batch_size=default_batch if batch is None else batch, warmup_steps=10
    )
    return name, model_cfg, train_cfg


def peak_flops(peak_gflops: float = 0.0, devices: int = 1) -> tuple[float | None, str]:
    """Peak FLOP/s of the `devices` the bench's step runs on, and where it came from: the
    training loop's rule (gopher.metrics.total_peak_flops), --peak_gflops per device; on a
    CPU the host's figure, which its simulated devices share."""
    import jax

    from gopher import metrics as metrics_lib

    device = jax.devices()[0]
    peak, kind = metrics_lib.total_peak_flops(device, devices, peak_gflops * 1e9)
    source = {
        "override": "--peak_gflops",
        "table": device.device_kind,
        "measured": "measured fp32 matmul (XLA's dot or the CPU kernels' BLAS, the faster)",
        "unknown": "unknown (pass --peak_gflops)",
    }
    return peak, source[kind]


def _one_device(model_cfg, train_cfg, precision, remat, tokens):
    """(state, tokens, the compiled step) on one device, jitted with the state donated."""
    import jax

    from gopher import train as train_lib

    fns = train_lib.make_train_functions(model_cfg, train_cfg, precision, remat)
    state = jax.jit(fns.init)(jax.random.key(train_cfg.seed))
    tokens = jax.device_put(tokens)
    return state, tokens, jax.jit(fns.train_step, donate_argnums=0).lower(state, tokens).compile()


def _on_mesh(model_cfg, train_cfg, mesh_shape, zero, tokens):
    """(state, tokens, the compiled step) jitted over a (data, model) mesh with the state's
    shardings, as training builds it (gopher.sharding.build_train)."""
    import jax

    from gopher import config as gopher_config
    from gopher import sharding

    d, m = mesh_shape
    devices.require_devices(d * m, f"{d},{m}")
    parallel = gopher_config.ParallelConfig(data=d, model=m, zero=zero)
    mesh = sharding.make_mesh(parallel, jax.devices()[: d * m])
    _, sharded = sharding.build_train(model_cfg, train_cfg, parallel, mesh)
    state = sharded.init(jax.random.key(train_cfg.seed))
    tokens = sharding.make_global_batch(tokens, mesh)
    return state, tokens, sharded.train_step.lower(state, tokens).compile()


def compiled_program(exe, devices: int, model_flops: float) -> dict:
    """What the compiled step does per device (gopher/hlo.py): its matmul FLOPs, their
    total over the devices against the model's FLOPs (about equal on every mesh when the
    work is split, the model axis times more when it is replicated), and its collectives
    (runs and bytes one device sends per step, ring algorithm)."""
    from gopher import hlo

    module = hlo.Module(exe.as_text())
    dots = module.dot_flops()
    collectives: dict[str, dict] = {}
    for c in module.collectives():
        entry = collectives.setdefault(c.op, {"runs": 0, "sent_gib": 0.0})
        entry["runs"] += c.runs
        entry["sent_gib"] += c.runs * c.sent / 2**30
    for entry in collectives.values():
        entry["sent_gib"] = round(entry["sent_gib"], 4)
    text = exe.as_text()
    return {
        "dot_flops_per_device": dots,
        "dot_flops_x_devices_over_model": round(dots * devices / model_flops, 4) if dots else None,
        # The CPU kernels' custom calls (gopher/cpu_kernels.py): matmuls these counts miss.
        "uncounted_custom_calls": text.count('custom_call_target="Gopher'),
        "collectives": collectives,
    }


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
    mesh=None,
    zero=0,
) -> dict:
    """Times the jitted train step (on one device, or with `mesh` (D, M) over a data x
    model mesh); the record `experiments.bench` prints."""
    import jax
    import numpy as np

    from gopher import host_memory
    from gopher import metrics as metrics_lib

    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps={steps} --warmup={warmup}; pass --steps>=1 and --warmup>=0")
    if zero and not mesh:
        raise ValueError(f"--zero={zero} shards over a mesh's data axis; pass --mesh=D,M too")
    b, t = train_cfg.batch_size, model_cfg.seq_len
    train_cfg = dataclasses.replace(train_cfg, precision=precision, remat=remat)
    rows = np.random.default_rng(1).integers(0, model_cfg.vocab_size, (b, t + 1), np.int32)
    start = time.perf_counter()
    if mesh:
        state, tokens, compiled = _on_mesh(model_cfg, train_cfg, mesh, zero, rows)
    else:
        state, tokens, compiled = _one_device(model_cfg, train_cfg, precision, remat, rows)
    compile_s = time.perf_counter() - start  # (with the state's init, a small part)
    host_memory.after_compiling(jax.devices()[0].platform)  # as the training loop does

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
    n = mesh[0] * mesh[1] if mesh else 1
    used = jax.devices()[:n]
    stats = [d.memory_stats() or {} for d in used]  # None on CPU
    step_s = statistics.median(times)
    tokens_per_sec = b * t / step_s
    flops_token = metrics_lib.flops_per_token(model_cfg, t)
    peak, peak_source = peak_flops(peak_gflops, n)
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
        "mesh": list(mesh) if mesh else None,
        "zero": zero,
        "microbatches": train_cfg.microbatches,
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
        # The fused CPU kernel's BLAS when the step runs it (gopher/cpu_kernels.py), else None.
        "cpu_attention_kernel": cpu_kernels.blas()
        if "GopherAttentionFwd" in compiled.as_text()
        else None,
        # the largest of the devices' allocator peaks (accelerators only)
        "device_peak_gib": round(max(s["peak_bytes_in_use"] for s in stats) / 2**30, 3)
        if all("peak_bytes_in_use" in s for s in stats)
        else None,
        "temp_gib": round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3),
        "compiled": compiled_program(compiled, n, flops_token * b * t),
        "profile": profile_summary,
        "jax": jax.__version__,
        "devices": f"{n}x {used[0].device_kind}",
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
    from gopher import host_memory

    host_memory.run_programs_on_calling_thread()  # as experiments.train
    steps, warmup = _STEPS.value, _WARMUP.value
    with common.user_errors(_VERBOSE.value):
        name, model_cfg, train_cfg = configs(
            _SHAPE.value, _PRESET.value, _SEQ_LEN.value, _BATCH.value, _ATTENTION.value
        )
        if _UNROLL.value:
            train_cfg = dataclasses.replace(train_cfg, unroll_layers=_UNROLL.value)
        if _MICROBATCHES.value != 1:
            train_cfg = dataclasses.replace(train_cfg, microbatches=_MICROBATCHES.value)
        mesh, zero = devices.parse_mesh(_MESH.value) if _MESH.value else None, int(_ZERO.value)
        if _PEER.value and (mesh or zero or _MICROBATCHES.value != 1):
            raise ValueError(
                "--peer times one device against the peer's one process; drop --mesh, --zero "
                "and --microbatches (or run them without --peer)"
            )
        if _PEER.value and _PROFILE.value:
            raise ValueError(
                f"--profile={_PROFILE.value} traces one run, not a side by side; drop --peer "
                "to profile gopher's step"
            )
        if _PEAK_GFLOPS.value < 0:
            raise ValueError(f"--peak_gflops={_PEAK_GFLOPS.value}; pass a positive figure or 0")
        if mesh and mesh[0] * mesh[1] > 1:  # one device is every backend's default
            devices.ask_cpu_devices(mesh[0] * mesh[1])
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
                attention=_ATTENTION.value,
                unroll_layers=_UNROLL.value,
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
            mesh,
            zero,
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
