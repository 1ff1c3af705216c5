"""experiments.trace_summary: kernel time by name from a perfetto trace, on a hand-built
device trace (sums checked by hand) and on a real jax.profiler trace of this CPU."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from experiments import trace_summary


def _write(path, events):
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def _meta(kind, pid, tid, name):
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def _span(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_device_stream_kernels_are_summed_and_other_lines_ignored(tmp_path):
    events = [
        _meta("process_name", 1, 0, "/host:CPU"),
        _meta("process_name", 2, 0, "/device:GPU:0"),
        _meta("thread_name", 2, 7, "Stream #14(Compute)"),
        _meta("thread_name", 2, 8, "XLA Modules"),  # one span over the whole step: not counted
        _meta("thread_name", 1, 3, "python"),
        _span(2, 7, "nvjet_sm90_tst_128x256_NNT", 0, 3000),
        _span(2, 7, "nvjet_sm90_tst_128x256_NNT", 4000, 1000),
        _span(2, 7, "_dq_kernel", 5000, 2000),
        _span(2, 7, "loop_add_fusion_8", 7000, 500),
        _span(2, 7, "memcpy128", 7500, 250),
        _span(2, 7, "ncclAllReduceKernel", 7750, 250),
        _span(2, 8, "jit_train_step", 0, 8000),
        _span(1, 3, "PjitFunction(train_step)", 0, 9000),
    ]
    _write(tmp_path / "plugins" / "profile" / "run", events)
    s = trace_summary.summarize(str(tmp_path))
    assert s["source"] == "/device:GPU:0 / Stream #14(Compute)"
    assert s["busy_ms"] == pytest.approx(7.0)
    top = s["kernels"][0]
    assert (top["name"], top["ms"], top["calls"]) == ("nvjet_sm90_tst_128x256_NNT", 4.0, 2)
    assert top["share"] == pytest.approx(4 / 7)
    assert [k["name"] for k in s["kernels"]][1] == "_dq_kernel"
    want = {
        "matmul": 4.0,
        "triton (pallas)": 2.0,
        "fusion": 0.5,
        "copy / transpose": 0.25,
        "collective": 0.25,
    }
    assert {k: v["ms"] for k, v in s["families"].items()} == pytest.approx(want)
    text = trace_summary.format_summary(s)
    assert text.splitlines()[0] == "busy 7.00 ms on /device:GPU:0 / Stream #14(Compute)"
    assert trace_summary.main([str(tmp_path), "--top=2"]) == 0


def test_real_cpu_trace_counts_each_thunk_once(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(x).block_until_ready()
    s = trace_summary.summarize(str(tmp_path), top=100)
    names = [k["name"] for k in s["kernels"]]
    assert names and not [n for n in names if n.startswith(("ThunkExecutor", "SlinkyThreadPool"))]
    # every kernel of the program ran once per call: 3 calls each
    assert {k["calls"] for k in s["kernels"]} == {3}, s["kernels"]
    assert sum(k["ms"] for k in s["kernels"]) == pytest.approx(s["busy_ms"])


def test_missing_trace_is_one_line(tmp_path, capsys):
    assert trace_summary.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no perfetto_trace.json.gz under" in err and "--profile=DIR" in err
    assert len(err.splitlines()) == 1
