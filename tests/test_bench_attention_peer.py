"""experiments/bench_attention_peer.py: one attention layer, gopher's against the PyTorch
peer's, and how far any attention could take the step.

Like experiments.bench, the module registers absl flags when imported, so it runs in a
subprocess here; its accounting (experiments/attention_reach.py) and the machine record
(experiments/bench_machine.py) are imported. The torch side needs torch (see
tests/test_bench.py).
"""

import json
import subprocess
import sys

import pytest

from experiments import attention_reach as m
from experiments.bench_machine import machine_record, usable_cores
from tests.test_bench import ENV, ROOT, _one_line_error, _peer_python


def _attention_peer(*flags, python=sys.executable):
    cmd = [python, "-m", "experiments.bench_attention_peer", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _lowered_attention_flops(b, h, kd, t, chunk, group):
    """Matmul FLOPs of gopher's grouped attention, forward and backward, read from the
    lowered program of its gradient (gopher/hlo.py: every dot_general, loop trips
    included): a count of what the implementation does, apart from the formula."""
    import jax
    import jax.numpy as jnp

    from gopher import attention_xla, hlo

    def loss(qkv, r, u, vb):
        out = attention_xla.grouped_relative_attention(qkv, r, u, vb, None, chunk, group)
        return jnp.sum(out)

    f32 = jnp.float32
    args = (
        jax.ShapeDtypeStruct((b, t, 3, h * kd), f32),
        jax.ShapeDtypeStruct((h, t + 1, kd), f32),
        jax.ShapeDtypeStruct((h, 1, kd), f32),
        jax.ShapeDtypeStruct((h, 1, kd), f32),
    )
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).as_text()
    return hlo.lowered_dot_flops(text)


def test_attention_peer_flop_counts_match_the_programs():
    """gopher's count against the matmuls of the lowered forward+backward program, at
    three shapes (one with a ragged last chunk, one in head groups); the peer's is its
    kernel's: 7 matmuls over the keys of whole 512-key blocks, so below 512 keys the full
    T^2 scores (the masked half included), at T=1024 (256-query blocks: 512, 512, 1024 and
    1024 keys) three quarters of them."""
    shapes = [(2, 3, 8, 64, 16, 3), (2, 3, 8, 100, 32, 3), (2, 4, 8, 256, 64, 2)]
    got = [m.gopher_matmul_flops(*s[:5]) for s in shapes]
    peer_100, peer_512, peer_1024 = (m.torch_matmul_flops(8, 16, 32, t) for t in (100, 512, 1024))
    for shape, flops in zip(shapes, got, strict=True):
        b, h, kd = shape[:3]
        # (+ the u and v_bias gradients' sums over the batch, written as matmuls with ones
        # by gopher.layers.sum_over_batch: 2 b h K each)
        assert flops + 2 * (2 * b * h * kd) == _lowered_attention_flops(*shape), shape
    square = 7 * 2 * 8 * 16 * 32  # FLOPs per (query, key) pair over the 7 matmuls
    assert (peer_100, peer_512) == (square * 100**2, square * 512**2)
    assert peer_1024 == square * 1024**2 * 3 / 4


def test_attention_peer_gopher_side_end_to_end(tmp_path):
    out = tmp_path / "attention_peer.json"
    shape = ["--batch=2", "--heads=2", "--key_size=8", "--seq_len=64", "--layers=3"]
    proc = _attention_peer(*shape, "--sides=gopher", "--rounds=2", "--reps=1", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert [sorted(r) for r in rec["rounds"]] == [["gopher"], ["gopher"]]
    g = rec["summary"]["gopher"]
    times = [r["gopher"]["forward_backward_s"] for r in rec["rounds"]]
    assert g["forward_backward_s"] == pytest.approx(sum(times) / 2)  # median of two
    assert g["per_step_s"] == pytest.approx(3 * g["forward_backward_s"])
    assert rec["shape"] == {"batch": 2, "heads": 2, "key_size": 8, "seq_len": 64}
    assert "gopher: forward" in proc.stdout and "per layer" in proc.stdout
    # Each run appends its summary beside the (overwritten) record.
    (line,) = (tmp_path / "attention_peer_sittings.jsonl").read_text().splitlines()
    line = json.loads(line)
    assert line["gopher_forward_backward_ms"] == pytest.approx(
        g["forward_backward_s"] * 1e3, abs=0.05
    )
    assert line["git"] == rec["git"] and "torch_forward_ms" not in line
    _one_line_error(_attention_peer("--sides=gopher,jax"), "--sides=jax is not a side")
    _one_line_error(_attention_peer("--seq_len=0"), "--seq_len=0: pass 1 or more")
    _one_line_error(_attention_peer("--target=0"), "--target=0.0: pass a ratio above 0")


def test_attention_peer_torch_side_runs():
    shape = ["--batch=1", "--heads=2", "--key_size=8", "--seq_len=32"]
    proc = _attention_peer("--side=torch", *shape, "--reps=1", python=_peer_python())
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(proc.stdout.splitlines()[-1])
    # (at this size the two times are too close to order: tens of microseconds)
    assert rec["side"] == "torch" and rec["forward_backward_s"] > 0 and rec["forward_s"] > 0
    assert rec["threads"] == usable_cores()


def test_least_work_is_nine_passes_over_each_query_and_its_past():
    """Against a count query by query: query i scores keys 0..i, and each of the 9 passes
    does one K-long dot product (2 K FLOPs) per (query, key) pair."""
    for b, h, kd, t in ((2, 3, 8, 64), (1, 1, 4, 7), (8, 16, 32, 512)):
        pairs = sum(i + 1 for i in range(t))
        got = m.least_matmul_flops(b, h, kd, t)
        assert got == 9 * 2 * kd * b * h * pairs
        # and below what gopher's chunks do (11 passes, keys to each chunk's end)
        assert got < m.gopher_matmul_flops(b, h, kd, t, 128)


def _sitting(**over):
    step = {
        "batch": 4,
        "seq": 100,
        "heads": 2,
        "d_model": 16,
        "layers": 3,
        "vocab": 50,
        "peak_flops": 2e9,
        "summary": {"gopher_tokens_per_sec": 400.0, "peer_tokens_per_sec": 500.0},
        "time": "t",
        "git": "g",
    }
    return {**step, **over}


def test_reach_by_hand():
    # A made-up sitting: 400 tokens of 4 x 100 a step -> gopher 1.0 s, the peer 0.8 s.
    summary = {
        "gopher": {"forward_backward_s": 0.1},
        "torch": {"forward_backward_s": 0.05, "matmul_gflops_per_s": 2.0},
    }
    r = m.reach(summary, _sitting(), (4, 2, 8, 100), 3, 1.25)
    least = 9 * 2 * 4 * 2 * 8 * (100 * 101 / 2)  # 581,760 FLOPs
    assert r["least_matmul_flops"] == least
    assert r["gopher_rest_s"] == pytest.approx(1.0 - 3 * 0.1)  # 0.7 s
    assert r["peer_rest_s"] == pytest.approx(0.8 - 3 * 0.05)
    assert r["target_step_s"] == pytest.approx(0.8 / 1.25)  # 0.64 s: less than the rest
    assert r["attention_budget_per_layer_s"] == pytest.approx((0.64 - 0.7) / 3)
    assert r["needed_gflops_per_s"] is None  # no attention time left at all
    text = m.reach_text(r, _sitting(), 3, 2.0)
    assert (
        "1.25x needs 0.640 s, beside the rest of the step as it is: no attention time is left"
        in text
    )
    assert "out of reach" in text.splitlines()[1] and "inf" not in text
    at_peer = 0.7 + 3 * least / 2e9
    assert r["ratio_least_work_at_peer_rate"] == pytest.approx(0.8 / at_peer)
    # outside attention: 6 x (12 L D^2 + D V) a token, and W_R over 101 distances a layer
    rest = 6 * 400 * (12 * 3 * 16**2 + 16 * 50) + 6 * 3 * 101 * 16**2
    assert r["rest_matmul_flops"] == rest
    assert r["rest_at_peak_s"] == pytest.approx(rest / 2e9)
    budget = (0.64 - rest / 2e9) / 3
    assert r["attention_budget_per_layer_rest_at_peak_s"] == pytest.approx(budget)
    assert r["needed_gflops_per_s_rest_at_peak"] == pytest.approx(least / budget / 1e9)


def _this_machine():
    return {k: machine_record()[k] for k in ("cpu", "cores")}


def test_step_sitting_of_another_shape_or_machine_is_not_used(tmp_path):
    path = tmp_path / "sitting.json"
    path.write_text(json.dumps(_sitting()))
    same = m.step_record(str(path), (4, 2, 8, 100), 3)
    assert same[0]["batch"] == 4 and same[1] == ""
    for shape, layers in (([4, 2, 8, 128], 3), ([4, 2, 16, 100], 3), ([4, 2, 8, 100], 8)):
        step, why = m.step_record(str(path), tuple(shape), layers)
        assert step is None and "another shape" in why
    step, why = m.step_record(str(tmp_path / "none.json"), (4, 2, 8, 100), 3)
    assert step is None and "no step sitting" in why
    path.write_text(json.dumps(_sitting(peak_flops=None)))
    step, why = m.step_record(str(path), (4, 2, 8, 100), 3)
    assert step is None and "no peer figure or matmul peak" in why
    # A sitting from another machine (a fresh clone reads the committed one) is not set
    # beside this machine's attention times.
    here = _this_machine()
    path.write_text(json.dumps(_sitting(machine={"cpu": "other", "cores": here["cores"]})))
    step, why = m.step_record(str(path), (4, 2, 8, 100), 3, here)
    assert step is None and "another machine (other," in why and "make bench-peer" in why
    path.write_text(json.dumps(_sitting(machine=here)))
    step, why = m.step_record(str(path), (4, 2, 8, 100), 3, here)
    assert step is not None and why == ""


def test_both_sides_print_the_reach_beside_a_sitting_of_their_shape(tmp_path):
    python = _peer_python()
    sitting, out = tmp_path / "sitting.json", tmp_path / "attention_peer.json"
    sitting.write_text(json.dumps(_sitting(machine=_this_machine())))
    shape = ["--batch=4", "--heads=2", "--key_size=8", "--seq_len=100", "--layers=3"]
    flags = ["--rounds=1", "--reps=1", f"--peer_python={python}", f"--out={out}"]
    proc = _attention_peer(*shape, *flags, f"--step_record={sitting}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reach, beside the step sitting of t (g)" in proc.stdout, proc.stdout
    r = json.loads(out.read_text())["summary"]["reach"]
    assert r["least_matmul_flops"] == 9 * 2 * 4 * 2 * 8 * (100 * 101 / 2)
    assert r["gopher_step_s"] == pytest.approx(1.0)
    proc = _attention_peer(*shape, *flags, f"--step_record={tmp_path / 'none.json'}")
    assert proc.returncode == 0 and "reach: no step sitting" in proc.stdout, proc.stdout
