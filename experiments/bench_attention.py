"""Relative attention: the Pallas kernels (and on GPU cuDNN's flash attention with the
position bias, gopher/attention_cudnn.py) against the XLA path, forward and
forward+backward, and (--train_step) a preset's whole train step with each.

    python -m experiments.bench_attention                      # GPU / TPU: seq 512 ... 8192
    python -m experiments.bench_attention --tiny               # CPU smoke (interpret mode)
    python -m experiments.bench_attention --check              # kernel vs XLA path, exit 1 if apart
    python -m experiments.bench_attention --train_step --preset=1.4b --seq_len=2048 \\
        --batch=8 --precision=mixed --remat=full

Attention mode: q, k, v [B, T, H*K] (default H=16, K=128, the 1.4b row's heads; B =
--tokens / T, so every length does the same number of query rows) in bf16, r [H, T+1, K].
Each implementation is jitted on its own, compiled, warmed up and timed --reps times
(median). Achieved FLOP/s count the model's attention FLOPs, causal (half the scores):
forward 3 matmuls ((q+u) k^T, (q+v) r^T, p v) = 3 B H T^2 K; forward+backward 3x that.
The XLA path also pays the skew's copies and, past its 16 query chunks, key blocks the
mask removes; those are not counted. Temporaries are XLA's memory_analysis() figures;
`max_rel_diff_vs_xla` is the kernel's largest difference from the XLA path (output, or
any of the six gradients) over that array's largest magnitude (bf16: ~1e-2 expected).

Train-step mode: the preset's train step (gopher.train.make_train_functions, state
donated) at --seq_len, --batch, --precision, --remat with attention=xla, =pallas,
(off TPU) =pallas_fused and (on GPU) =cudnn;
MFU = tokens/s x (6 N + 12 L H Q T) / peak FLOP/s of the device (gopher/metrics.py).

Check mode (--check, before any timing is trusted on a new device): the kernel's output
and all six gradients against the XLA path's, bf16, H=4, K=64, at a length off the tile
and one on it (100 and 256), and 256 at K=128 (H=2) (--tiny: 40 and 64, H=2, K=16), for
each backward (the three-kernel "split" one; off TPU also the one-kernel "fused" one,
gopher/pallas_attention_fused.py, whose timings are the `pallas_fused` rows; on an NVIDIA
GPU also `cudnn`); exits 1 when any relative difference reaches 5e-2. --stages, --warps
and --block set the Triton kernels' pipelining, warps and tiles.

Writes one JSON (device kind, jax version, the command, every row) to --out (default
benchmarks/bench_attention_<device kind>.json).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import statistics
import sys
import time

from absl import app, flags

from experiments import common
from experiments.bench_machine import git_revision, machine_record, median_seconds

_TINY = flags.DEFINE_bool("tiny", False, "CPU smoke: seq 64 and 128, 2 heads, key 16.")
_SEQS = flags.DEFINE_list("seqs", ["512", "1024", "2048", "4096", "8192"], "Sequence lengths.")
_HEADS = flags.DEFINE_integer("heads", 16, "Heads.")
_KEY = flags.DEFINE_integer("key_size", 128, "Key size.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Query rows per call: batch = tokens / seq.")
_BLOCK = flags.DEFINE_integer("block", 0, "Kernel tile rows (0: the platform's default).")
_STAGES = flags.DEFINE_integer("stages", 0, "GPU: Triton pipelining stages (0: the default).")
_WARPS = flags.DEFINE_integer("warps", 0, "GPU: Triton warps per program (0: the default).")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per measurement (median).")
_TRAIN = flags.DEFINE_bool("train_step", False, "Time a preset's train step instead.")
_CHECK = flags.DEFINE_bool("check", False, "Only compare the kernel with the XLA path.")
_PRESET = flags.DEFINE_string("preset", "1.4b", "Train-step mode: model preset.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Train-step mode: sequence length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Train-step mode: sequences per step.")
_PRECISION = flags.DEFINE_string("precision", "mixed", "Train-step mode: precision.")
_REMAT = flags.DEFINE_string("remat", "full", "Train-step mode: remat policy.")
_STEPS = flags.DEFINE_integer("steps", 10, "Train-step mode: timed steps (median).")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/bench_attention_<dev>.json).")


def _time(fn, *args, reps: int) -> float:
    """Median seconds of `reps` blocking calls of a compiled `fn` (after one warm-up)."""
    import jax

    return median_seconds(lambda: jax.block_until_ready(fn(*args)), reps)


def _rel_diff(got, want) -> float:
    """max |got - want| over max |want|, in fp32: how far the kernel is from the XLA path."""
    import jax.numpy as jnp

    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want))) / max(float(jnp.max(jnp.abs(want))), 1e-30)


def _kernel_options(platform: str, backward: str = "split"):
    from gopher import pallas_attention

    return pallas_attention.options_for(
        platform,
        _BLOCK.value or None,
        stages=_STAGES.value or None,
        backward=backward,
        warps=_WARPS.value or None,
    )


def _cudnn_here() -> bool:
    """Whether cuDNN's attention (gopher/attention_cudnn.py) runs on this device."""
    import jax

    from gopher import attention_cudnn

    device = jax.devices()[0]
    return not attention_cudnn.platform_problem(device.platform, device.device_kind)


def attention_rows(platform: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from gopher import attention_cudnn, attention_xla, pallas_attention

    h, kd = (2, 16) if _TINY.value else (_HEADS.value, _KEY.value)
    seqs = [64, 128] if _TINY.value else parse_seqs(_SEQS.value)
    opts = _kernel_options(platform)
    rows = []
    for t in seqs:
        b = max(1, (256 if _TINY.value else _TOKENS.value) // t)
        keys = jax.random.split(jax.random.key(t), 6)
        shapes = [(b, t, h * kd)] * 3 + [(h, t + 1, kd), (h, 1, kd), (h, 1, kd)]
        args = [
            0.1 * jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes, strict=True)
        ]
        mask = jnp.tril(jnp.ones((t, t), bool))
        chunk = max(attention_xla.QUERY_CHUNK, -(-t // attention_xla.MAX_QUERY_CHUNKS))
        impls = {
            "xla": lambda *a, mask=mask, chunk=chunk: attention_xla.relative_attention(
                *a, mask, chunk
            ),
            "pallas": lambda *a: pallas_attention.relative_attention(*a, opts=opts),
        }
        if "fused" in pallas_attention.backwards_for(platform):
            fused = _kernel_options(platform, "fused")
            impls["pallas_fused"] = lambda *a, o=fused: pallas_attention.relative_attention(
                *a, opts=o
            )
        if _cudnn_here():
            impls["cudnn"] = attention_cudnn.relative_attention
        flops = 3 * b * h * t * t * kd
        results = {}  # mode -> the XLA path's outputs, to check the kernel's against
        for name, fn in impls.items():

            def loss(*a, fn=fn):
                return jnp.sum(fn(*a).astype(jnp.float32))

            for mode, f, work in (
                ("forward", fn, flops),
                ("forward+backward", jax.grad(loss, argnums=range(6)), 3 * flops),
            ):
                compiled = jax.jit(f).lower(*args).compile()
                seconds = _time(compiled, *args, reps=_REPS.value)
                row = {
                    "impl": name,
                    "mode": mode,
                    "seq_len": t,
                    "batch": b,
                    "heads": h,
                    "key_size": kd,
                    "block": opts.block if name.startswith("pallas") else chunk,
                    "seconds": seconds,
                    "tflops_per_sec": work / seconds / 1e12,
                    "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
                }
                got = jax.tree.leaves(compiled(*args))
                if name == "xla":
                    results[mode] = got
                else:  # the largest difference from the XLA path, relative to its largest value
                    row["max_rel_diff_vs_xla"] = max(
                        _rel_diff(g, w) for g, w in zip(got, results[mode], strict=True)
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


CHECK_TOLERANCE = 5e-2  # bf16: p and ds are rounded to bf16 for the matmuls on both paths


def check_rows(platform: str) -> list[dict]:
    """The kernel's output and six gradients against the XLA path's, relative max difference."""
    import jax
    import jax.numpy as jnp

    from gopher import attention_cudnn, attention_xla, pallas_attention

    rows = []
    cases = (  # (batch, heads, key size, length): off the tile, on it; K = 128 as in 1.4b
        [(2, 2, 16, 40), (2, 2, 16, 64)]
        if _TINY.value
        else [(2, 4, 64, 100), (2, 4, 64, 256), (1, 2, 128, 256)]
    )
    for b, h, kd, t in cases:
        keys = jax.random.split(jax.random.key(t), 6)
        shapes = [(b, t, h * kd)] * 3 + [(h, t + 1, kd), (h, 1, kd), (h, 1, kd)]
        args = [
            0.3 * jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes, strict=True)
        ]

        def value_and_grads(fn, args=args):
            def run(*a):
                out, vjp = jax.vjp(fn, *a)
                return (out, *vjp(jnp.ones_like(out)))

            return jax.jit(run)(*args)

        want = value_and_grads(
            lambda *a: attention_xla.relative_attention(*a, None, attention_xla.QUERY_CHUNK)
        )
        candidates = {}  # backward -> (the kernel's options or None, its function)
        for backward in pallas_attention.backwards_for(platform):
            opts = _kernel_options(platform, backward)
            fn = functools.partial(pallas_attention.relative_attention, opts=opts)
            candidates[backward] = (opts, fn)
        if _cudnn_here():  # cuDNN's flash attention with the position bias
            candidates["cudnn"] = (None, attention_cudnn.relative_attention)
        for backward, (opts, fn) in candidates.items():
            got = value_and_grads(fn)
            labels = ("out", "dq", "dk", "dv", "dr", "du", "dv_bias")
            for label, w, g in zip(labels, want, got, strict=True):
                diff = _rel_diff(g, w)
                row = {"seq_len": t, "heads": h, "key_size": kd, "output": label}
                row |= {
                    "block": opts and opts.block,
                    "stages": opts and opts.stages,
                    "backward": backward,
                }
                rows.append({**row, "max_rel_diff_vs_xla": diff, "ok": diff < CHECK_TOLERANCE})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def train_rows() -> list[dict]:
    import jax
    import numpy as np

    from gopher import config, metrics, pallas_attention, train

    rows = []
    backwards = pallas_attention.backwards_for(jax.devices()[0].platform)
    fused = ("pallas_fused",) if "fused" in backwards else ()
    cudnn = ("cudnn",) if _cudnn_here() else ()
    for impl in ("xla", "pallas", *fused, *cudnn):
        model_cfg = config.get_preset(_PRESET.value).replace(seq_len=_SEQ_LEN.value, attention=impl)
        train_cfg = config.TrainConfig(steps=100, batch_size=_BATCH.value, warmup_steps=10)
        fns = train.make_train_functions(model_cfg, train_cfg, _PRECISION.value, _REMAT.value)
        state = jax.jit(fns.init)(jax.random.key(0))
        step = jax.jit(fns.train_step, donate_argnums=0)
        tokens = np.random.default_rng(0).integers(
            0, model_cfg.vocab_size, (_BATCH.value, _SEQ_LEN.value + 1), dtype=np.int32
        )
        start = time.perf_counter()
        compiled = step.lower(state, tokens).compile()
        compile_s = time.perf_counter() - start
        for _ in range(2):
            state, m = compiled(state, tokens)
        jax.block_until_ready(m)
        times = []
        for _ in range(_STEPS.value):
            start = time.perf_counter()
            state, m = compiled(state, tokens)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times)
        tokens_per_sec = _BATCH.value * _SEQ_LEN.value / step_s
        peak = metrics.device_peak_flops(jax.devices()[0])
        row = {
            "impl": impl,
            "preset": _PRESET.value,
            "seq_len": _SEQ_LEN.value,
            "batch": _BATCH.value,
            "precision": _PRECISION.value,
            "remat": _REMAT.value,
            "compile_s": compile_s,
            "step_s": step_s,
            "tokens_per_sec": tokens_per_sec,
            "peak_flops": peak,
            "mfu": metrics.mfu(tokens_per_sec, metrics.flops_per_token(model_cfg), peak),
            "loss": float(m["loss"]),
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def parse_seqs(values: list[str]) -> list[int]:
    try:
        seqs = [int(v) for v in values]
    except ValueError:
        seqs = []
    if not seqs or min(seqs) < 1:
        raise ValueError(f"--seqs={','.join(values)}: pass positive lengths, such as 512,1024")
    return seqs


def check_flags() -> None:
    """One line naming a bad flag before anything compiles."""
    from gopher import config

    for flag in (_HEADS, _KEY, _TOKENS, _REPS, _SEQ_LEN, _BATCH, _STEPS):
        if flag.value < 1:
            raise ValueError(f"--{flag.name}={flag.value}: pass 1 or more")
    if not _TINY.value:
        parse_seqs(_SEQS.value)
    if _TRAIN.value:
        config.get_preset(_PRESET.value)  # names the known presets when it is not one


def main(argv):
    del argv
    import jax

    with common.user_errors(verbose=False):
        check_flags()
    device = jax.devices()[0]
    if _CHECK.value:
        rows, mode = check_rows(device.platform), "_check"
    elif _TRAIN.value:
        rows, mode = train_rows(), "_train"
    else:
        rows, mode = attention_rows(device.platform), ""
    kind = re.sub(r"[^A-Za-z0-9]+", "_", device.device_kind).strip("_").lower()
    out = _OUT.value or os.path.join("benchmarks", f"bench_attention{mode}_{kind}.json")
    record = {
        "command": shlex.join(
            [os.path.basename(sys.executable), "-m", __spec__.name, *sys.argv[1:]]
        ),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "machine": machine_record(),
        "git": git_revision(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {out}")
    bad = [
        f"T={r['seq_len']} K={r['key_size']} {r['backward']} {r['output']} "
        f"{r['max_rel_diff_vs_xla']:.2e}"
        for r in rows
        if not r.get("ok", True)
    ]
    if bad:
        print(
            f"the kernel differs from the XLA path by {CHECK_TOLERANCE} or more: {', '.join(bad)}"
        )
        sys.exit(1)
    if _CHECK.value:
        print("kernel matches the XLA path")


if __name__ == "__main__":
    app.run(main)
