"""gopher/step_log.py: tokens/s, step time and MFU of the training log against their closed
forms, on a scripted clock (the loop itself is not run: a Run's few fields stand in)."""

import io
import json
import math
import os
import types

import jax.numpy as jnp
import pytest

from gopher import config, metrics, step_log


def _log(monkeypatch, train_cfg, times):
    """A StepLog over a stand-in Run whose clock reads `times` in turn; and its records."""
    clock = iter(times)
    monkeypatch.setattr(step_log, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    written = []
    run = types.SimpleNamespace(
        train_cfg=train_cfg,
        model_cfg=config.get_preset("test"),
        say=lambda line: None,
        show_progress=False,
        data=types.SimpleNamespace(stats=lambda: {}),
        writer=types.SimpleNamespace(write=written.append),
        end=train_cfg.steps,
        ckpt=types.SimpleNamespace(directory="unused"),
    )
    return step_log.StepLog(run, start=0), written, run.model_cfg


def _metrics(loss=2.0):
    return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(1.0), "skipped": jnp.int32(0)}


def test_tokens_per_sec_step_time_and_mfu_are_the_closed_form(monkeypatch):
    # 8 simulated CPU devices share one host: a configured peak counts once, not 8 times.
    peak = 5e9
    train_cfg = config.TrainConfig(
        steps=7, batch_size=4, batch_schedule=((4, 8),), log_every=1, peak_flops=peak
    )
    # The clock: at start, then at each read of steps 1..7 (each read follows the next
    # step's dispatch); the loop is blocked 0.5 s on a checkpoint before step 3's read.
    times = [0.0, 5.0, 7.0, 8.5, 9.5, 20.0, 22.0, 23.0]
    log, written, model_cfg = _log(monkeypatch, train_cfg, times)
    assert log.peak == peak
    for step in range(1, 8):
        log.hold(step, _metrics())
        if step == 3:
            log.exclude(0.5)  # a checkpoint between reads: left out of the next interval
    log.flush()
    by_step = {r["step"]: r for r in written}
    assert sorted(by_step) == list(range(1, 8))
    seq = model_cfg.seq_len
    # Steps that may include compilation (the first, the first at the new batch): no speed.
    # No NaN stand-in either (strict JSON readers such as jq reject NaN): the keys are left out.
    for step in (1, 5):
        assert not {"tokens_per_sec", "mfu", "step_time_s"} & set(by_step[step])
    for rec in written:
        json.dumps(rec, allow_nan=False)
    # tokens a step: 4 sequences to step 4, 8 after; seconds between reads, less the 0.5 s.
    expected = {2: 4 * seq / 2.0, 3: 4 * seq / 1.0, 4: 4 * seq / 1.0, 6: 8 * seq / 2.0}
    expected[7] = 8 * seq / 1.0
    layers, h, k = model_cfg.num_layers, model_cfg.num_heads, model_cfg.key_size
    flops_token = 6 * metrics.param_count(model_cfg) + 12 * layers * h * k * seq
    for step, tps in expected.items():
        rec = by_step[step]
        assert rec["tokens_per_sec"] == pytest.approx(tps), step
        assert rec["mfu"] == pytest.approx(tps * flops_token / peak), step
        causal = 6 * metrics.param_count(model_cfg) + 6 * layers * h * k * seq
        assert rec["mfu_causal"] == pytest.approx(tps * causal / peak), step
        assert rec["step_time_s"] == pytest.approx(rec["batch_size"] * seq / tps), step
    assert [by_step[s]["tokens"] for s in range(1, 8)] == [
        seq * n for n in (4, 8, 12, 16, 24, 32, 40)
    ]
    assert by_step[2]["bpt"] == pytest.approx(2.0 / math.log(2))


def test_a_run_of_non_finite_steps_stops_with_the_checkpoint_named(monkeypatch):
    train_cfg = config.TrainConfig(steps=10, batch_size=4, max_bad_steps=2, peak_flops=1e9)
    log, written, _ = _log(monkeypatch, train_cfg, [0.0] + [1.0 * i for i in range(1, 11)])
    log.hold(1, _metrics(float("nan")))
    log.hold(2, _metrics(2.0))  # a good step resets the count
    log.hold(3, _metrics(float("inf")))
    log.hold(4, _metrics(float("nan")))
    with pytest.raises(step_log.Diverged, match="2 consecutive steps \\(to step 4\\)"):
        log.flush()


def test_processes_on_one_machine_count_its_cpu_peak_once(tmp_path, monkeypatch):
    """launch.local's 2 processes x 4 CPU devices share one machine: the configured
    per-machine peak is the MFU denominator once, as for one process with 8 devices (a
    peak counted per process would halve MFU)."""
    from launch import local

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", root)
    # Each process writes its figure to a file of its own (its stdout interleaves with
    # gloo's log lines).
    body = (
        "import jax\n"
        "from gopher import config, distributed, step_log\n"
        "distributed.initialize()\n"
        "peak = step_log.peak_flops(config.TrainConfig(peak_flops=5e9))\n"
        f"path = {str(tmp_path)!r} + f'/peak-{{jax.process_index()}}'\n"
        "open(path, 'w').write(' '.join(map(str, peak)))\n"
        "distributed.shutdown()\n"
    )
    out = io.StringIO()
    job = local.Job(["python", "-c", body], 2, 4, str(tmp_path / "logs"), out=out)
    job.start()
    assert job.wait(grace_s=30) == 0, out.getvalue()[-3000:]
    peaks = [(tmp_path / f"peak-{i}").read_text() for i in range(2)]
    assert peaks == ["5000000000.0 configured"] * 2, out.getvalue()[-3000:]
