"""Relative attention's matmul work, and how far any attention could take a train step.

The accounting behind experiments/bench_attention_peer.py: each side's matmul FLOPs per
forward+backward as its code does them (gopher's chunked relative attention, PyTorch's CPU
flash attention as its kernel tiles the keys), the least work relative attention can do, the
rest of a train step's matmuls, and `reach`: beside a train-step sitting of
`experiments.bench --peer=torch` (`step_record`), the attention time a target ratio leaves
and the rate the least work would need in it.
"""

from __future__ import annotations

import json


def gopher_matmul_flops(b: int, h: int, kd: int, t: int, chunk: int) -> float:
    """Matmul FLOPs of one forward+backward of gopher's chunked relative attention."""
    from gopher.attention_xla import _query_chunks

    total = 0
    for a, s in _query_chunks(t, chunk):
        c = s - a
        total += 2 * b * h * c * kd * (7 * s + 4 * (s + 1))  # 7 over keys, 4 over distances
    return float(total)


def torch_matmul_flops(b: int, h: int, kd: int, t: int) -> float:
    """Matmul FLOPs of one causal forward+backward of PyTorch's CPU flash attention as its
    kernel tiles it (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): blocks of 32, 64 or
    256 queries (T < 192, < 768, else), each against whole 512-key blocks up to its last
    query, so below 512 keys nothing is skipped; 7 matmuls (forward 2, backward 5 with the
    scores recomputed). Measured on this 2-core machine with torch 2.13 (8 x 16 heads, key
    size 32, 2026-12-05): causal and full attention took the same time at T=512 (97.0 and
    95.8 ms forward+backward) and 0.78x at T=1024 (259 and 329 ms), where this count gives
    0.75x."""
    q_block = 256 if t >= 768 else 64 if t >= 192 else 32
    kv_block = 512
    scores = 0
    for start in range(0, t, q_block):
        rows = min(q_block, t - start)
        last = start + rows  # keys 0 .. last-1 are unmasked for some query of the block
        scores += rows * min(-(-last // kv_block) * kv_block, t)
    return 7.0 * 2 * b * h * kd * scores


def least_matmul_flops(b: int, h: int, kd: int, t: int) -> float:
    """The least matmul work of relative attention's forward+backward: 9 passes over the
    exact causal half (query i against keys 0..i), none recomputed. Forward: content scores,
    position scores, p v; backward: dv, dp, dq from each score term, dk, d r."""
    return 9.0 * 2 * b * h * kd * t * (t + 1) / 2


def rest_matmul_flops(step: dict) -> float:
    """Matmul FLOPs of a train step outside attention, from a bench --peer record: per token
    6 x (12 L D^2 + D V) (q, k, v, the output projection and the 4D MLP; the tied output
    layer), plus W_R over the T+1 distances once a step and layer (forward and backward)."""
    n, d, t = step["layers"], step["d_model"], step["seq"]
    tokens = step["batch"] * t
    return 6.0 * tokens * (12 * n * d * d + d * step["vocab"]) + 6.0 * n * (t + 1) * d * d


def reach(summary: dict, step: dict, shape: tuple, layers: int, target: float) -> dict:
    """What any attention could bring the step sitting `step` to, beside `summary`'s layer
    timings: the rest of gopher's step (its step less `layers` attention layers), the
    attention time a `target` ratio leaves, the rate the least work needs in it, the ratio
    at the peer kernel's rate, and the same with the rest at `step`'s measured matmul peak."""
    b, h, kd, t = shape
    tokens = step["batch"] * step["seq"]
    gopher_s = tokens / step["summary"]["gopher_tokens_per_sec"]
    peer_s = tokens / step["summary"]["peer_tokens_per_sec"]
    rest_s = gopher_s - layers * summary["gopher"]["forward_backward_s"]
    peer_rest_s = peer_s - layers * summary["torch"]["forward_backward_s"]
    target_s = peer_s / target
    least = least_matmul_flops(b, h, kd, t)
    peer_rate = summary["torch"]["matmul_gflops_per_s"] * 1e9
    at_peer_rate_s = rest_s + layers * least / peer_rate
    rest_flops = rest_matmul_flops(step)
    rest_peak_s = rest_flops / step["peak_flops"]
    out = {
        "target": target,
        "step_sitting": {"time": step.get("time"), "git": step.get("git")},
        "gopher_step_s": gopher_s,
        "peer_step_s": peer_s,
        "gopher_rest_s": rest_s,
        "peer_rest_s": peer_rest_s,
        "target_step_s": target_s,
        "attention_budget_per_layer_s": (target_s - rest_s) / layers,
        "least_matmul_flops": least,
        "ratio_least_work_at_peer_rate": peer_s / at_peer_rate_s,
        "rest_matmul_flops": rest_flops,
        "peak_flops": step["peak_flops"],
        "rest_at_peak_s": rest_peak_s,
        "attention_budget_per_layer_rest_at_peak_s": (target_s - rest_peak_s) / layers,
    }
    for key in ("", "_rest_at_peak"):
        budget = out[f"attention_budget_per_layer{key}_s"]
        # None: no attention time is left at all (the rest alone is over the target step)
        out[f"needed_gflops_per_s{key}"] = least / budget / 1e9 if budget > 0 else None
    return out


def step_record(
    path: str, shape: tuple, layers: int, machine: dict | None = None
) -> tuple[dict | None, str]:
    """The step sitting at `path` when it is of this shape (and, given `machine`, was taken
    on a machine of its CPU model and cores), else None and why."""
    b, h, kd, t = shape
    try:
        with open(path) as f:
            step = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"no step sitting to set it beside ({e})"
    got = tuple(step.get(k) for k in ("batch", "heads", "d_model", "seq", "layers"))
    if got != (b, h, h * kd, t, layers):
        return None, f"{path} is another shape (batch, heads, d_model, seq, layers = {got})"
    if "peer_tokens_per_sec" not in step.get("summary", {}) or not step.get("peak_flops"):
        return None, f"{path} has no peer figure or matmul peak (run bench --peer=torch)"
    if machine is not None:
        theirs = {k: step.get("machine", {}).get(k) for k in ("cpu", "cores")}
        ours = {k: machine.get(k) for k in ("cpu", "cores")}
        if theirs != ours:
            return None, (
                f"{path} was taken on another machine ({theirs['cpu']}, {theirs['cores']} "
                f"cores; this one: {ours['cpu']}, {ours['cores']}); run `make bench-peer` here"
            )
    return step, ""


def _budget_text(r: dict, key: str, peer_rate: float | None) -> str:
    budget, rate = r[f"attention_budget_per_layer{key}_s"], r[f"needed_gflops_per_s{key}"]
    if rate is None:
        return f"no attention time is left ({budget * 1e3:.1f} ms a layer): out of reach"
    text = f"attention {budget * 1e3:.1f} ms a layer: the least work at {rate:.0f} GFLOP/s"
    return text + (
        f", {rate / peer_rate:.2f}x the peer kernel's {peer_rate:.0f}" if peer_rate else ""
    )


def reach_text(r: dict, step: dict, layers: int, peer_rate: float) -> str:
    """`reach`'s record in four lines, `peer_rate` the peer kernel's GFLOP/s."""
    return (
        f"reach, beside the step sitting of {step.get('time')} ({step.get('git')}): gopher's step "
        f"{r['gopher_step_s']:.3f} s, the peer's {r['peer_step_s']:.3f} s; outside attention "
        f"{r['gopher_rest_s']:.3f} s and {r['peer_rest_s']:.3f} s (x{layers} layers)\n"
        f"  {r['target']:g}x needs {r['target_step_s']:.3f} s, beside the rest of the step as it "
        f"is: {_budget_text(r, '', peer_rate)} (the least work is "
        f"{r['least_matmul_flops'] / 1e9:.2f} GFLOP)\n"
        f"  the least work at the peer kernel's rate: "
        f"{r['ratio_least_work_at_peer_rate']:.3f}x\n"
        f"  with the rest at the measured matmul peak ({r['rest_matmul_flops'] / 1e12:.3f} TFLOP "
        f"at {r['peak_flops'] / 1e9:.1f} GFLOP/s: {r['rest_at_peak_s']:.2f} s): "
        f"{_budget_text(r, '_rest_at_peak', None)}"
    )
