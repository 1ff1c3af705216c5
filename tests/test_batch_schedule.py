"""The batch schedule (Gopher 280b: 1536 -> 3072 sequences midway), on a `test`-sized run
whose batch switches from 8 to 16 sequences after step 10: tokens counted right in the
logs and the LR schedule, the same data stream as an unswitched run, bit-identical resumes
before, at and after the switch."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache as cc

from gopher import config, loop, optim
from gopher.data.mixture import Mixture, Source
from gopher.data.pipeline import build_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 64  # the test preset's seq_len
SWITCH, STEPS, WARMUP = 10, 16, 5
SCHEDULE = ((SWITCH, 16),)


def _train_cfg(**kw):
    base = dict(
        steps=STEPS,
        batch_size=8,
        batch_schedule=SCHEDULE,
        warmup_steps=WARMUP,
        log_every=1,
        eval_every=1000,
        eval_batches=1,
        checkpoint_every=1000,
        async_checkpoint=False,
        tensorboard=False,
        watchdog_s=0.0,
        peak_flops=1e12,  # no CPU matmul measurement
    )
    return config.TrainConfig(**{**base, **kw})


def _tokens_oracle(n):
    """Tokens seen after n steps: 8 sequences per step to step 10, then 16."""
    return T * (8 * min(n, SWITCH) + 16 * max(n - SWITCH, 0))


def _lr_oracle(count, peak, init=1e-7, final_ratio=0.1):
    """Gopher's warm-up + cosine on tokens: linear over the first WARMUP steps' tokens,
    cosine to peak / 10 over the run's total tokens."""
    x, warm, total = _tokens_oracle(count), _tokens_oracle(WARMUP), _tokens_oracle(STEPS)
    if x < warm:
        return init + (peak - init) * x / warm
    end = peak * final_ratio
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (x - warm) / (total - warm)))


# ------------------------------------------------------------------------- config


def test_batch_at_each_step_and_sequences_seen():
    tc = _train_cfg()
    assert [tc.batch_size_at(s) for s in (1, 10, 11, 16)] == [8, 8, 16, 16]
    assert [tc.sequences_seen(n) * T for n in range(STEPS + 1)] == [
        _tokens_oracle(n) for n in range(STEPS + 1)
    ]
    assert tc.batch_sizes() == (8, 16)
    assert _train_cfg(steps=10).batch_sizes() == (8,)  # the switch is never reached


def test_280b_doubles_at_half_of_300b_tokens():
    model = config.get_preset("280b")
    assert (model.batch_size, model.batch_schedule) == (1536, ((47_684, 3072),))
    tc = config.TrainConfig(batch_size=1536, batch_schedule=model.batch_schedule)
    # 47,683 steps of 1536 x 2048 tokens fall short of 150B; 47,684 reach it.
    assert 47_683 * 1536 * 2048 < 150e9 <= 47_684 * 1536 * 2048
    assert config.steps_for_tokens(tc, 2048) == 71_526  # + 23,842 steps of 3072
    assert tc.sequences_seen(71_526) * 2048 >= 300e9 > tc.sequences_seen(71_525) * 2048


@pytest.mark.parametrize(
    "schedule, message",
    [
        ((10, 16), r"batch_schedule = \(10, 16\) must be \(after_step, batch_size\) pairs"),
        (((10, 12),), r"batch 12 after step 10 is not a multiple of batch_size 8"),
        (((20, 16), (10, 32)), r"after_steps \[20, 10\] out of order"),
        (((0, 16),), r"pairs of positive integers"),
    ],
)
def test_bad_schedules_name_the_value_and_the_fix(schedule, message):
    with pytest.raises(config.ConfigError, match=message):
        config.TrainConfig(batch_size=8, batch_schedule=schedule)


def _parse(*args):
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", f"--config={ROOT}/experiments/configs/gopher.py:test", *args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def test_the_command_line_sets_a_schedule():
    cfg = _parse("--config.train.batch_schedule=((10, 16),)")
    assert config.train_from_dict(dict(cfg.train)).batch_schedule == ((10, 16),)
    assert _parse().train.batch_schedule == ()


def test_a_bad_schedule_on_the_command_line_is_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=experiments/configs/gopher.py:test",
            f"--workdir={tmp_path}",
            "--config.train.batch_schedule=((10, 12),)",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: TrainConfig.batch_schedule: batch 12 after step 10 is not a multiple of "
        "batch_size 8; use multiples of it in --config.train.batch_schedule (Gopher: 1536 -> 3072)"
    ]


def test_schedule_lists_become_tuples():
    tc = config.TrainConfig(batch_size=8, batch_schedule=[[10, 16]])
    assert tc.batch_schedule == ((10, 16),)


# ---------------------------------------------------------------------- LR schedule


def test_lr_runs_on_tokens_seen():
    model, tc = config.get_preset("test"), _train_cfg()
    lr = optim.learning_rate_schedule(model, tc)
    got = [float(lr(c)) for c in range(STEPS + 1)]
    want = [_lr_oracle(c, model.max_lr) for c in range(STEPS + 1)]
    # optax's warm-up is (init - peak) * (1 - frac) + peak in fp32: 1e-7 comes out 1.0012e-7.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # Jitted with a traced step, as the optimiser calls it.
    np.testing.assert_allclose(float(jax.jit(lr)(13)), want[13], rtol=1e-6)
    # Without a schedule it is the step-based warm-up and cosine, bit for bit.
    plain = optim.learning_rate_schedule(model, _train_cfg(batch_schedule=()))
    steps = optax.warmup_cosine_decay_schedule(1e-7, model.max_lr, WARMUP, STEPS, model.max_lr / 10)
    assert [float(plain(c)) for c in range(STEPS + 1)] == [float(steps(c)) for c in range(17)]


# ----------------------------------------------------------------------------- data


def _mixture(batch_size, process_index=0, process_count=1):
    rng = np.random.default_rng(0)
    sources = [Source(n, rng.integers(0, 100, 5000).astype(np.int32), np.zeros(0)) for n in "ab"]
    return Mixture(
        sources, {"a": 0.7, "b": 0.3}, np.ones(100), batch_size, 16, 0, process_index, process_count
    )


def test_mixture_reads_a_doubled_batch_as_the_next_two_steps():
    fresh = _mixture(8)
    expected = np.concatenate([fresh.next() for _ in range(SWITCH + 2 * 6)])
    switched = _mixture(8)
    got = [switched.take(1, (0, 8)) for _ in range(SWITCH)]
    got += [switched.take(2, (0, 16)) for _ in range(6)]
    np.testing.assert_array_equal(np.concatenate(got), expected)
    assert switched.state() == fresh.state()  # the same position, in mixer steps


def test_mixture_hosts_together_read_the_whole_doubled_batch():
    whole = _mixture(8).take(2, (0, 16))
    hosts = [_mixture(8, i, 4) for i in range(4)]  # 4 rows each of 16
    parts = [m.take(2, (4 * i, 4 * i + 4)) for i, m in enumerate(hosts)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tokenizer and token cache for the stdlib source, made once."""
    d = tmp_path_factory.mktemp("shared")
    data = config.DataConfig(tokenizer_sample_bytes=300_000, cache_dir=str(d / "cache"))
    build_pipeline(config.get_preset("test"), _train_cfg(), data, str(d), say=lambda *a: None)
    return d


def _data_cfg(shared):
    return config.DataConfig(
        tokenizer_path=str(shared / "tokenizer.model"), cache_dir=str(shared / "cache")
    )


def test_switched_pipeline_continues_the_unswitched_stream(shared):
    model, tc = config.get_preset("test"), _train_cfg()
    plain = build_pipeline(model, _train_cfg(batch_schedule=()), _data_cfg(shared), str(shared))
    expected = np.concatenate([plain.next_batch(8, (0, 8)) for _ in range(SWITCH + 2 * 6)])
    switched = build_pipeline(model, tc, _data_cfg(shared), str(shared))
    got = [switched.next_batch(tc.batch_size_at(s), (0, tc.batch_size_at(s))) for s in range(1, 17)]
    np.testing.assert_array_equal(np.concatenate(got), expected)
    # Two hosts' rows of a doubled batch make the whole batch.
    hosts = [build_pipeline(model, tc, _data_cfg(shared), str(shared)) for _ in range(2)]
    for h in hosts:
        h.restore(plain.state() | {"step": SWITCH})
    parts = [h.next_batch(16, (8 * i, 8 * i + 8)) for i, h in enumerate(hosts)]
    np.testing.assert_array_equal(np.concatenate(parts), expected[SWITCH * 8 : SWITCH * 8 + 16])


# ---------------------------------------------------------------------- a real run


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent compilation cache for this test's runs: each builds its step anew, and
    the resumed pieces then load the whole run's executables instead of compiling them."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (str(tmp_path / "jax_cache"), 0, 0), strict=True):
        jax.config.update(name, value)
    yield
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()


def _run(workdir, shared, stop_at_step=0):
    tc = _train_cfg(stop_at_step=stop_at_step)
    parallel = config.ParallelConfig(data=-1)  # 8 simulated devices: rows split 8 ways
    return loop.run(config.get_preset("test"), tc, _data_cfg(shared), str(workdir), parallel, False)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def test_run_counts_tokens_and_resumes_bit_identically_across_the_switch(
    tmp_path, shared, compile_cache
):
    whole = _run(tmp_path / "whole", shared)
    records = _records(tmp_path / "whole")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    peak = config.get_preset("test").max_lr
    for r in records:
        n = r["step"]
        assert r["tokens"] == _tokens_oracle(n) == r["data/stdlib/tokens"]
        assert r["batch_size"] == (8 if n <= SWITCH else 16)
        assert r["lr"] == pytest.approx(_lr_oracle(n - 1, peak), rel=1e-6, abs=1e-9)

    pieces = tmp_path / "pieces"
    for stop in (7, SWITCH, 13, 0):  # before, at and after the switch, then to the end
        resumed = _run(pieces, shared, stop_at_step=stop)
    again = _records(pieces)
    assert [r["step"] for r in again] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in again] == [r["loss"] for r in records]
    for a, b in zip(
        jax.tree.leaves(resumed["state"]), jax.tree.leaves(whole["state"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _cli(workdir, shared, *overrides):
    """experiments.train with the flags that make `_train_cfg()` from the test preset."""
    return [
        "experiments.train",
        "--config=experiments/configs/gopher.py:test",
        f"--workdir={workdir}",
        "--config.data.source=stdlib",
        f"--config.data.tokenizer_path={shared}/tokenizer.model",
        f"--config.data.cache_dir={shared}/cache",
        f"--config.train.steps={STEPS}",
        f"--config.train.batch_schedule={SCHEDULE}",
        f"--config.train.warmup_steps={WARMUP}",
        "--config.train.log_every=1",
        "--config.train.eval_every=1000",
        "--config.train.eval_batches=1",
        "--config.train.checkpoint_every=1000",
        "--config.train.tensorboard=false",
        "--config.train.peak_flops=1e12",
        *overrides,
    ]


@pytest.mark.slow
def test_two_processes_switch_then_resume_on_one(tmp_path, shared):
    """2 processes x 4 devices feed 4 of 8 rows, then 8 of 16 after the switch; stopped at
    step 13, the job resumes on one process to the losses of one uninterrupted process."""
    _run(tmp_path / "whole", shared)
    expected = [r["loss"] for r in _records(tmp_path / "whole")]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    workdir = tmp_path / "job"
    job = subprocess.run(
        [sys.executable, "-m", "launch.local", "--processes=2", "--devices-per-process=4"]
        + [f"--logdir={tmp_path}/logs", "--", "python", "-m"]
        + _cli(workdir, shared, "--config.train.stop_at_step=13"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stdout[-4000:]
    one = subprocess.run(
        [sys.executable, "-m", *_cli(workdir, shared)],
        cwd=ROOT,
        env=env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    records = _records(workdir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in records] == [_tokens_oracle(n) for n in range(1, STEPS + 1)]
    np.testing.assert_allclose([r["loss"] for r in records], expected, rtol=1e-5)
