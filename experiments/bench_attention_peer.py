"""One attention layer on CPU, gopher's against the PyTorch peer's: where the step gap is.

    python -m experiments.bench_attention_peer        # the nanoGPT shape, fp32 (installs nothing:
                                                      # torch from `make bench-peer`)

Gopher's side is the attention the CPU train step runs (--attention=auto: the fused C++
kernel, `gopher.cpu_kernels.relative_attention`; =xla: `gopher.attention_xla.
grouped_relative_attention`, heads in groups; either from q, k, v packed as their
projection leaves them, with the relative position term, in causal chunks); the peer's is what benchmarks/peers/
gpt2_torch.py calls, `F.scaled_dot_product_attention(q, k, v, is_causal=True)` on [B, H, T, K].
Each times the forward and the forward+backward against a fixed random cotangent (median of
--reps calls after two warm-ups), in its own process, alternating --rounds times; as in the
train-step sitting, gopher runs with glibc's huge-page malloc and the peer with and without
it, the faster kept (`timing_env`). Multiplied by --layers,
beside the whole step's times of `make bench-peer`, the figures split the step's gap into
attention and the rest. Each side's matmul FLOPs per forward+backward are counted as its
code does them: gopher's 11 matmuls per query chunk (forward: content, position, p v;
backward: the two score matmuls again, then dv, dp, dq twice, dk, d r) over the keys each
chunk sees, the position ones over one more distance; the peer's 7 (forward 2, backward 5
with the scores recomputed, as flash attention does) over the keys its kernel's blocks see
(`attention_reach.torch_matmul_flops`: at T=512 every key, the masked half included).
(XLA's cost_analysis() counts a loop's body once, so it cannot count the head groups.)

With both sides and a train-step sitting of the same shape (--step_record, the one
`make bench-peer` has just written), it also prints how far any attention could take the
step toward --target: the rest of the step is the sitting's step less the layers' attention,
and relative attention's least work (`attention_reach.least_matmul_flops`) is set against the time that
leaves and against the peer kernel's rate.

Writes the rounds and their medians to --out (benchmarks/bench_attention_peer_cpu.json).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time

from absl import app, flags

from experiments import attention_reach, common
from experiments.bench_machine import (
    ROOT,
    git_revision,
    machine_record,
    median_seconds,
    timing_env,
    usable_cores,
)
from experiments.bench_peer import peer_python, run_json, sittings_path

_BATCH = flags.DEFINE_integer("batch", 8, "Sequences.")
_HEADS = flags.DEFINE_integer("heads", 16, "Heads.")
_KEY = flags.DEFINE_integer("key_size", 32, "Key size.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Sequence length.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Layers of the step the figures are set beside.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds; each runs gopher, then the peer.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per measurement (median).")
_SIDES = flags.DEFINE_list("sides", ["gopher", "torch"], "Which sides to run.")
_SIDE = flags.DEFINE_enum("side", None, ["gopher", "torch"], "Internal: run one side here.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "cpu", "xla"], "Gopher's attention (auto: as the CPU step)."
)
_PEER_PYTHON = flags.DEFINE_string("peer_python", None, "Interpreter with torch (default: this).")
_OUT = flags.DEFINE_string(
    "out", os.path.join("benchmarks", "bench_attention_peer_cpu.json"), "JSON written."
)
_STEP = flags.DEFINE_string(
    "step_record",
    os.path.join("benchmarks", "bench_nanogpt_peer.json"),
    "The train-step sitting (experiments.bench --peer=torch) to set the layer beside: what "
    "any attention could reach (skipped when its shape is not this one).",
)
_TARGET = flags.DEFINE_float("target", 1.1, "The gopher/peer tokens/s ratio asked for.")
_SHAPE = (_BATCH, _HEADS, _KEY, _SEQ)  # the order gopher_side and torch_side take them


def gopher_side(b: int, h: int, kd: int, t: int, reps: int, choice: str = "auto") -> dict:
    import jax
    import jax.numpy as jnp

    from gopher import cpu_kernels
    from gopher.attention import attention_layout
    from gopher.attention_xla import (
        MAX_QUERY_CHUNKS,
        QUERY_CHUNK,
        grouped_relative_attention,
        heads_per_group,
    )

    keys = jax.random.split(jax.random.key(0), 3)
    qkv = 0.3 * jax.random.normal(keys[0], (b, t, 3, h * kd), jnp.float32)  # [B, T, 3, H*K]
    r = 0.3 * jax.random.normal(keys[1], (h, t + 1, kd), jnp.float32)  # [H, T+1, K]
    # A random cotangent, not the sum's ones, which XLA could fold into the backward's dots.
    d_out = jax.random.normal(keys[2], (b, t, h * kd), jnp.float32)
    bias = jnp.zeros((h, 1, kd), jnp.float32)
    kernel = attention_layout(choice, "cpu").implementation == "cpu"
    if kernel and cpu_kernels.problem():
        raise SystemExit(f"the CPU attention kernel cannot run: {cpu_kernels.problem()}")
    if kernel:
        chunk, group = cpu_kernels.CHUNK, None
        what = f"gopher.cpu_kernels.relative_attention ({cpu_kernels.blas()})"

        def forward(qkv, r):
            return cpu_kernels.relative_attention(qkv, r, bias, bias, chunk)
    else:
        chunk = max(QUERY_CHUNK, -(-t // MAX_QUERY_CHUNKS))  # as RelativeAttention chooses it
        group = heads_per_group(b, h, t, chunk)
        what = "gopher.attention_xla.grouped_relative_attention"

        def forward(qkv, r):
            return grouped_relative_attention(qkv, r, bias, bias, None, chunk, group)

    def both(qkv, r, d_out):
        _, vjp = jax.vjp(forward, qkv, r)
        return vjp(d_out)

    fwd = jax.jit(forward).lower(qkv, r).compile()
    fwd_bwd = jax.jit(both).lower(qkv, r, d_out).compile()
    return {
        "side": "gopher",
        "what": what,
        "heads_per_group": group,
        "query_chunk": chunk,
        "forward_s": median_seconds(lambda: jax.block_until_ready(fwd(qkv, r)), reps, warmups=2),
        "forward_backward_s": median_seconds(
            lambda: jax.block_until_ready(fwd_bwd(qkv, r, d_out)), reps, warmups=2
        ),
        "forward_backward_matmul_flops": attention_reach.gopher_matmul_flops(b, h, kd, t, chunk),
        "jax": jax.__version__,
    }


def torch_side(b: int, h: int, kd: int, t: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(usable_cores())  # as the step's peer (benchmarks/peers/gpt2_torch.py)
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, t, kd, requires_grad=True) for _ in range(3))  # [B, H, T, K]
    d_out = torch.randn(b, h, t, kd)  # a random cotangent, as gopher's side

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_backward():
        q.grad = k.grad = v.grad = None  # as the peer's zero_grad(set_to_none=True)
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(d_out)

    return {
        "side": "torch",
        "what": "torch.nn.functional.scaled_dot_product_attention(is_causal=True)",
        "forward_s": median_seconds(forward, reps, warmups=2),
        "forward_backward_s": median_seconds(forward_backward, reps, warmups=2),
        "forward_backward_matmul_flops": attention_reach.torch_matmul_flops(b, h, kd, t),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _summary(rounds: list[dict], layers: int) -> dict:
    out = {}
    for side in ("gopher", "torch"):
        recs = [r[side] for r in rounds if side in r]
        if recs:
            out[side] = {
                key: statistics.median(r[key] for r in recs)
                for key in ("forward_s", "forward_backward_s")
            }
            out[side]["per_step_s"] = layers * out[side]["forward_backward_s"]
            flops = recs[0]["forward_backward_matmul_flops"]
            out[side]["forward_backward_matmul_flops"] = flops
            out[side]["matmul_gflops_per_s"] = flops / out[side]["forward_backward_s"] / 1e9
    if len(out) == 2:
        out["gopher_over_torch_forward_backward"] = (
            out["gopher"]["forward_backward_s"] / out["torch"]["forward_backward_s"]
        )
        out["step_gap_from_attention_s"] = out["gopher"]["per_step_s"] - out["torch"]["per_step_s"]
    return out


def _print_reach(summary: dict, shape: tuple, machine: dict) -> None:
    path = os.path.join(ROOT, _STEP.value)
    step, why = attention_reach.step_record(path, shape, _LAYERS.value, machine)
    if step is None:
        print(f"reach: {why}")
        return
    r = summary["reach"] = attention_reach.reach(summary, step, shape, _LAYERS.value, _TARGET.value)
    print(
        attention_reach.reach_text(r, step, _LAYERS.value, summary["torch"]["matmul_gflops_per_s"])
    )


def main(argv):
    del argv
    shape = tuple(flag.value for flag in _SHAPE)
    for flag in (*_SHAPE, _LAYERS, _ROUNDS, _REPS):
        if flag.value < 1:
            common.fail(f"--{flag.name}={flag.value}: pass 1 or more")
    if not _TARGET.value > 0:
        common.fail(f"--target={_TARGET.value}: pass a ratio above 0, such as 1.1")
    if _SIDE.value:  # one side, in this process
        if _SIDE.value == "gopher":
            record = gopher_side(*shape, _REPS.value, _ATTENTION.value)
        else:
            record = torch_side(*shape, _REPS.value)
        print(json.dumps(record), flush=True)
        return
    bad = [s for s in _SIDES.value if s not in ("gopher", "torch")]
    if bad:
        common.fail(f"--sides={','.join(bad)} is not a side; use gopher and/or torch")
    torch_version = None
    if "torch" in _SIDES.value:
        try:
            python, torch_version = peer_python(_PEER_PYTHON.value)
        except ValueError as e:
            common.fail(str(e))
    shape_flags = [f"--{flag.name}={flag.value}" for flag in (*_SHAPE, _REPS, _ATTENTION)]
    module = ["-m", "experiments.bench_attention_peer", *shape_flags]
    rounds = []
    for i in range(_ROUNDS.value):
        rec = {}
        for side in _SIDES.value:
            exe = sys.executable if side == "gopher" else python
            # As the step sitting: gopher with huge-page malloc, the peer with and without
            # it, the faster kept.
            tries = []
            for hugetlb in (True,) if side == "gopher" else (False, True):
                try:
                    got = run_json([exe, *module, f"--side={side}"], timing_env(hugetlb), side)
                except ValueError as e:  # the side's own one line, then how to see it whole
                    common.fail(str(e))
                tries.append({**got, "hugetlb": hugetlb})
            rec[side] = min(tries, key=lambda x: x["forward_backward_s"])
            print(
                f"round {i + 1}/{_ROUNDS.value}: {side} forward "
                f"{rec[side]['forward_s'] * 1e3:.1f} ms, forward+backward "
                f"{rec[side]['forward_backward_s'] * 1e3:.1f} ms per layer",
                flush=True,
            )
        rounds.append(rec)
    summary = _summary(rounds, _LAYERS.value)
    for side in ("gopher", "torch"):
        if side in summary:
            s = summary[side]
            print(
                f"{side}: forward {s['forward_s'] * 1e3:.1f} ms, forward+backward "
                f"{s['forward_backward_s'] * 1e3:.1f} ms per layer ({s['matmul_gflops_per_s']:.0f} "
                f"matmul GFLOP/s, {s['forward_backward_matmul_flops'] / 1e9:.1f} GFLOP); "
                f"x{_LAYERS.value} layers {s['per_step_s']:.2f} s per step"
            )
    if "step_gap_from_attention_s" in summary:
        print(
            f"gopher/torch forward+backward {summary['gopher_over_torch_forward_backward']:.2f}x; "
            f"attention adds {summary['step_gap_from_attention_s']:.2f} s to gopher's step"
        )
    machine = machine_record(torch_version)
    if "step_gap_from_attention_s" in summary:
        _print_reach(summary, shape, machine)
    record = {
        "command": shlex.join(["python", "-m", __spec__.name, *sys.argv[1:]]),
        "shape": {flag.name: flag.value for flag in _SHAPE},
        "layers": _LAYERS.value,
        "machine": machine,
        "git": git_revision(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "summary": summary,
        "rounds": rounds,
    }
    out = os.path.join(ROOT, _OUT.value)  # an absolute --out stays as it is
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    history = sittings_path(out)
    with open(history, "a") as f:
        f.write(json.dumps(sitting_line(record)) + "\n")
    print(f"saved {out}; appended its summary to {history}")


def sitting_line(record: dict) -> dict:
    """One run of the attention benchmark as a line (the record itself is overwritten by
    the next run): when, where, each side's milliseconds a layer, and the reach."""
    summary = record["summary"]
    line = {
        "time": record["time"],
        "git": record["git"],
        "shape": record["shape"],
        "cpu": record["machine"]["cpu"],
        "torch": record["machine"].get("torch"),
    }
    for side in ("gopher", "torch"):
        if side in summary:
            line[f"{side}_forward_ms"] = round(summary[side]["forward_s"] * 1e3, 1)
            line[f"{side}_forward_backward_ms"] = round(
                summary[side]["forward_backward_s"] * 1e3, 1
            )
            line[f"{side}_matmul_gflops_per_s"] = round(summary[side]["matmul_gflops_per_s"], 1)
    if "reach" in summary:
        line["reach"] = summary["reach"]
    return line


if __name__ == "__main__":
    app.run(main)
