"""Runs that survive: SIGKILL / SIGTERM / corruption / resharding / NaN, as real subprocesses.

Every run here is `experiments.train` in its own process on 8 simulated CPU devices,
sharing one tokenizer and token cache so that start-up stays short.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gopher import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 120


def _cmd(workdir, shared, *overrides, preset="test", steps=STEPS):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config=experiments/configs/gopher.py:{preset}",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.data.source=stdlib",
        "--config.train.log_every=1",
        "--config.train.eval_every=40",
        "--config.train.checkpoint_every=10",
        "--config.train.batch_size=8",
        "--config.parallel.zero=1",
        f"--config.data.tokenizer_path={shared}/tokenizer.model",
        f"--config.data.cache_dir={shared}/cache",
        *overrides,
    ]


def _env(devices=8):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(workdir, shared, *overrides, devices=8, check=True):
    out = subprocess.run(
        _cmd(workdir, shared, *overrides),
        cwd=ROOT,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _records(workdir, kind="train"):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    return [r for r in lines if r["kind"] == kind]


def _losses(workdir):
    """step -> every loss logged for it (a step redone after a restart appears twice)."""
    out = {}
    for r in _records(workdir):
        out.setdefault(r["step"], []).append(r["loss"])
    return out


def _final_state(workdir, preset="test", **model_overrides):
    """The newest checkpoint's TrainState, restored onto one device."""
    from gopher import config, train

    model = config.get_preset(preset).replace(**model_overrides)
    fns = train.make_train_functions(model, config.TrainConfig())
    abstract = jax.eval_shape(fns.init, jax.random.key(0))
    ck = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ck.steps()[-1]
    state, _ = ck.restore(step, abstract)
    ck.close()
    return step, state


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tokenizer and token cache every run reads, made by one short run."""
    d = tmp_path_factory.mktemp("shared")
    warm = d / "warm"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--config=experiments/configs/gopher.py:test",
            f"--workdir={warm}",
            "--config.train.steps=1",
            f"--config.data.cache_dir={d}/cache",
        ],
        cwd=ROOT,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shutil.copy(warm / "tokenizer.model", d / "tokenizer.model")
    return str(d)


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
    """The uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    _run(workdir, shared)
    return workdir


def _assert_same_run(workdir, reference, steps=STEPS, preset="test", **model_overrides):
    ref, got = _losses(reference), _losses(workdir)
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    for step, losses in got.items():
        assert all(x == ref[step][0] for x in losses), f"step {step}: {losses} vs {ref[step]}"
    s1, a = _final_state(reference, preset, **model_overrides)
    s2, b = _final_state(workdir, preset, **model_overrides)
    assert s1 == s2 == steps
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _kill_at(cmd, workdir, kill_at):
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in _records(workdir)]
        if steps and steps[-1] >= kill_at:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # make test-all; the suite's time budget
def test_sigkill_at_five_random_steps_resumes_bit_identically(shared, reference, tmp_path):
    workdir = str(tmp_path / "run")
    for kill_at in sorted(random.Random(0).sample(range(8, STEPS - 5), 5)):
        _kill_at(_cmd(workdir, shared), workdir, kill_at)
    _run(workdir, shared)
    _assert_same_run(workdir, reference)
    # Steps after each kill's last checkpoint were redone and logged again.
    assert any(len(v) > 1 for v in _losses(workdir).values())


@pytest.mark.slow
def test_tiny_300_steps_killed_five_times_is_bit_identical(shared, tmp_path):
    """The acceptance run: `tiny`, 300 steps, 8 devices on a (4, 2) mesh with ZeRO-1."""
    steps = 300
    flags = [
        "--config.parallel.data=4",
        "--config.parallel.model=2",
        "--config.train.remat=full",
        "--config.model.seq_len=128",
        "--config.train.eval_every=100",
        "--config.train.checkpoint_every=25",
    ]
    tok = str(tmp_path / "tok")
    os.makedirs(tok)
    ref = str(tmp_path / "ref")

    def cmd(workdir):
        return _cmd(workdir, tok, *flags, preset="tiny", steps=steps)

    # The reference trains its own tokenizer; the killed run reuses it.
    ref_cmd = [c for c in cmd(ref) if "tokenizer_path" not in c]
    out = subprocess.run(
        ref_cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=3600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shutil.copy(os.path.join(ref, "tokenizer.model"), os.path.join(tok, "tokenizer.model"))
    workdir = str(tmp_path / "run")
    for kill_at in sorted(random.Random(1).sample(range(10, steps - 10), 5)):
        _kill_at(cmd(workdir), workdir, kill_at)
    out = subprocess.run(
        cmd(workdir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=3600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_same_run(workdir, ref, steps=steps, preset="tiny", seq_len=128)


@pytest.mark.parametrize(
    "sig, code",
    # Both in make test-all (with the one-process reference run they compare against, 29 s):
    # the suite keeps test_multihost's SIGTERM on one host, test_gcs's SIGKILL mid-save
    # resumed bit for bit, and the sweep smoke's kill and resume.
    [
        pytest.param(signal.SIGTERM, 75, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
    ],
    ids=["SIGTERM", "SIGINT"],
)
def test_signal_checkpoints_and_exits_then_resumes(shared, reference, tmp_path, sig, code):
    """SIGTERM (preemption) exits 75, Ctrl-C 130; both checkpoint, and resume bit-identically."""
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(
        _cmd(workdir, shared),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while proc.poll() is None:
        steps = [r["step"] for r in _records(workdir)]
        if steps and steps[-1] >= 33:
            break
        time.sleep(0.05)
    sent = time.time()
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, output[-2000:]
    assert time.time() - sent < 30
    step = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")).steps()[-1]
    assert step >= 33 and step % 10 != 0  # the signal's checkpoint, not a periodic one
    assert f"{sig.name}: checkpointed step {step}" in output
    assert "uncaught" not in output and "KeyboardInterrupt" not in output
    _run(workdir, shared)
    _assert_same_run(workdir, reference)


def _truncate(step_dir):
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.truncate(0)


def _tree_bytes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
    return out


RESTORE_FAILED_EXIT_CODE = 4  # experiments/train.py maps checkpoint.RestoreFailed to it


@pytest.mark.slow  # make test-all; tests/test_checkpoint.py holds the policy in unit tests
def test_corrupt_checkpoints_fall_back_or_stop_never_start_over(shared, reference, tmp_path):
    workdir = str(tmp_path / "run")
    ckdir = os.path.join(workdir, "checkpoints")
    _run(workdir, shared, "--config.train.stop_at_step=60")
    _truncate(os.path.join(ckdir, "60"))
    damaged = _tree_bytes(os.path.join(ckdir, "60"))
    out = _run(workdir, shared)
    assert "checkpoint step 60" in out.stdout + out.stderr
    assert "previous good checkpoint, step 50" in out.stdout + out.stderr
    _assert_same_run(workdir, reference)
    # The unreadable step was moved aside whole, not garbage-collected by max_to_keep.
    (moved,) = os.listdir(os.path.join(workdir, "quarantine", "checkpoints"))
    assert moved.startswith("60-")
    assert _tree_bytes(os.path.join(workdir, "quarantine", "checkpoints", moved)) == damaged

    # Every step unreadable: the run stops with an error naming them, and keeps them all.
    steps = checkpoint_lib.Checkpointer(ckdir).steps()
    for step in steps:
        _truncate(os.path.join(ckdir, str(step)))
    before = _tree_bytes(workdir)
    out = _run(workdir, shared, check=False)
    assert out.returncode == RESTORE_FAILED_EXIT_CODE, out.stderr[-3000:]
    for step in steps:
        assert f"step {step} (" in out.stderr
    assert "restart_from_scratch" in out.stderr
    after = _tree_bytes(workdir)
    assert {k: v for k, v in after.items() if "checkpoints" in k or "quarantine" in k} == {
        k: v for k, v in before.items() if "checkpoints" in k or "quarantine" in k
    }
    assert max(r["step"] for r in _records(workdir)) == STEPS  # trained nothing again


@pytest.mark.slow  # make test-all; the suite's time budget
def test_reshard_4x2_to_2x4_and_one_device(shared, tmp_path):
    base = str(tmp_path / "base")
    mesh_4x2 = ["--config.parallel.data=4", "--config.parallel.model=2"]
    _run(base, shared, "--config.train.stop_at_step=60", *mesh_4x2)
    runs = {}
    for name, overrides, devices in [
        ("4x2", mesh_4x2, 8),  # the uninterrupted run (resume is bit-exact on one mesh)
        ("2x4", ["--config.parallel.data=2", "--config.parallel.model=4"], 8),
        ("1", ["--config.parallel.data=1", "--config.parallel.model=1"], 1),
    ]:
        workdir = str(tmp_path / name)
        shutil.copytree(base, workdir)
        out = _run(workdir, shared, "--config.train.stop_at_step=70", *overrides, devices=devices)
        assert "resumed from checkpoint step 60" in out.stdout + out.stderr
        runs[name] = _losses(workdir)
    for name in ("2x4", "1"):
        for step in range(61, 71):
            want, got = runs["4x2"][step][-1], runs[name][step][-1]
            assert abs(got - want) / want < 1e-5, (name, step, got, want)


@pytest.mark.slow  # make test-all; the suite's time budget
def test_injected_nan_is_skipped_and_persistent_nan_stops(shared, tmp_path):
    once = str(tmp_path / "once")
    _run(once, shared, "--config.train.steps=20", "--config.train.inject_nan_steps=(7,)")
    recs = {r["step"]: r for r in _records(once)}
    assert not np.isfinite(recs[7]["grad_norm"]) and recs[20]["skipped"] == 1
    assert np.isfinite(recs[20]["loss"])

    always = str(tmp_path / "always")
    out = _run(
        always,
        shared,
        "--config.train.steps=40",
        "--config.train.max_bad_steps=3",
        "--config.train.inject_nan_steps=(12,13,14,15,16,17,18,19,20)",
        check=False,
    )
    assert out.returncode == 3
    assert "3 consecutive steps (to step 14)" in out.stderr
    assert checkpoint_lib.Checkpointer(os.path.join(always, "checkpoints")).steps() == [10]


def test_second_ctrl_c_exits_at_once():
    """The first Ctrl-C asks for a checkpoint at the step's end; a second exits at once."""
    code = (
        "import os, signal, time\n"
        "from gopher.stopping import Stopper\n"
        "with Stopper() as s:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "    print('first:', s.reached(1), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(1), capture_output=True, text=True
    )
    assert out.returncode == 130, out.stderr
    assert "first: SIGINT" in out.stdout and "not reached" not in out.stdout
    assert "second Ctrl-C: exiting now" in out.stderr


@pytest.mark.slow  # make test-all; tests/test_workdir_lock.py holds the lock in unit tests
def test_second_run_on_a_locked_workdir_refuses_and_the_first_is_unharmed(
    shared, reference, tmp_path
):
    """A launcher restarting a job whose old process still runs: the newcomer must not train."""
    workdir = str(tmp_path / "run")
    first = subprocess.Popen(
        _cmd(workdir, shared),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while first.poll() is None and not _records(workdir):
        time.sleep(0.05)
    started = time.time()
    second = subprocess.run(
        _cmd(workdir, shared), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    took = time.time() - started
    output, _ = first.communicate(timeout=600)
    assert first.returncode == 0, output[-2000:]
    assert second.returncode == 5, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "lock" in lines[0], lines
    assert took < 30  # refused before building data or compiling anything
    _assert_same_run(workdir, reference)


def _steps(workdir):
    ck = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ck.steps()
    finally:
        ck.close()


def _error_lines(out):
    return [x for x in out.stderr.splitlines() if x.strip()]


def test_failed_first_run_nothing_to_train_and_damaged_steps_each_in_one_line(shared, tmp_path):
    """A workdir's life: a first run that fails setting up, the corrected rerun, a rerun
    with nothing to train, a different experiment, every checkpoint damaged."""
    workdir = tmp_path / "run"
    flags = ["--config.train.steps=2", "--config.train.checkpoint_every=1"]
    # A failed first run (a typo in the tokenizer path) records no experiment, so the
    # corrected rerun is not refused as a different one.
    out = _run(workdir, shared, *flags, "--config.data.tokenizer_path=/no/tok.model", check=False)
    assert out.returncode == 2 and "tokenizer '/no/tok.model'" in out.stderr, out.stderr[-2000:]
    assert not (workdir / "config.json").exists()
    # The corrected run, on a mesh whose model axis (8) does not divide the 4 heads: the
    # log says how it is sharded.
    out = _run(workdir, shared, *flags, "--config.parallel.data=1", "--config.parallel.model=8")
    assert "sharding: num_heads 4 not divisible by model=8: heads are split mid-way" in out.stdout
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["data"]["tokenizer_path"] == f"{shared}/tokenizer.model"
    assert _steps(workdir) == [1, 2]
    # The last step's eval lost (the run killed while it ran, after its checkpoint): the
    # rerun has nothing to train but runs it, on the same checkpoint, to the same number.
    (ev,) = _records(workdir, "eval")
    metrics = workdir / "metrics.jsonl"
    kept_lines = [x for x in metrics.read_text().splitlines() if '"eval"' not in x]
    metrics.write_text("\n".join(kept_lines) + "\n")
    out = _run(workdir, shared, *flags)
    assert "already at step 2 >= steps 2; nothing to train" in out.stdout, out.stdout
    (again,) = _records(workdir, "eval")
    assert again["step"] == ev["step"] == 2  # another mesh than the run's: rounding differs
    assert again["heldout_bpb"] == pytest.approx(ev["heldout_bpb"], rel=1e-5)

    def kept():
        return {k: v for k, v in _tree_bytes(workdir).items() if not k.startswith("tensorboard")}

    before = kept()
    # Fewer steps than done: one line that says so, and nothing trained or rewritten.
    out = _run(workdir, shared, "--config.train.steps=1")
    assert "already at step 2 >= steps 1; nothing to train (raise --config.train.steps)" in (
        out.stdout
    )
    assert kept() == before
    # A workdir with checkpoints refuses a different experiment.
    out = _run(workdir, shared, *flags, "--config.model.num_layers=3", check=False)
    assert out.returncode == 2 and "different experiment" in out.stderr, out.stderr[-2000:]
    assert kept() == before
    # Every checkpoint's array data damaged: exit 4 with the one error line and no other
    # (tensorstore's reads failing late once printed a warning first, about half the time).
    for step in ("1", "2"):
        data = os.path.join(workdir, "checkpoints", step, "state", "ocdbt.process_0", "d")
        for name in sorted(os.listdir(data), key=lambda n: -os.path.getsize(f"{data}/{n}"))[:3]:
            os.truncate(os.path.join(data, name), 100)
    out = _run(workdir, shared, *flags, "--config.train.steps=4", check=False)
    assert out.returncode == RESTORE_FAILED_EXIT_CODE, out.stderr[-3000:]
    lines = _error_lines(out)
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint"), lines


@pytest.mark.slow  # make test-all; the suite's time budget
def test_moved_data_resumes_and_other_data_is_refused(shared, tmp_path):
    """data.paths may change (the directory moved); the data's sha256 may not."""
    text = tmp_path / "text"
    text.mkdir()
    stdlib = os.path.dirname(os.__file__)
    for name in sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:30]:
        shutil.copy(os.path.join(stdlib, name), text / name)
    workdir = tmp_path / "run"

    def train(where, steps, check=True):
        return _run(
            workdir,
            shared,
            "--config.data.source=files",
            f"--config.data.paths={where}",
            "--config.data.heldout_fraction=0.2",
            "--config.train.checkpoint_every=2",
            f"--config.train.steps={steps}",
            devices=1,
            check=check,
        )

    train(text, 2)
    moved = tmp_path / "moved"
    text.rename(moved)
    out = train(moved, 4)
    assert "resumed from checkpoint step 2" in out.stdout
    assert json.loads((workdir / "config.json").read_text())["data"]["paths"] == [str(moved)]
    assert _steps(workdir) == [2, 4]
    # The same path with an edited file is other data: refused, nothing touched.
    edited = sorted(moved.iterdir())[0]
    edited.write_text(edited.read_text() + "\n# edited\n")
    before = _tree_bytes(workdir / "checkpoints")
    out = train(moved, 6, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = _error_lines(out)
    assert len(lines) == 1 and "is not the data" in lines[0] and "data.paths" in lines[0], lines
    assert _tree_bytes(workdir / "checkpoints") == before


# The test preset's logits at this eval batch: 2**20 x 64 x 512 x 4 bytes = 128 GiB.
BIG_EVAL_BATCH = 2**20


def _cannot_allocate(nbytes: int) -> bool:
    """Whether one allocation of nbytes fails at once here (more than RAM and swap, and
    the kernel does not overcommit blindly), rather than succeeding or being OOM-killed."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        with open("/proc/sys/vm/overcommit_memory") as f:
            blind = f.read().strip() == "1"
    except (OSError, ValueError, IndexError):
        return False
    return not blind and info.get("MemTotal", 0) + info.get("SwapTotal", 0) < nbytes // 2


needs_small_host = pytest.mark.skipif(
    not _cannot_allocate(BIG_EVAL_BATCH * 64 * 512 * 4),
    reason="this host could hold the big eval batch; it would not run out of memory",
)


@pytest.mark.slow  # 28 s; make test-all, the suite's time budget (ci-fresh: 952 s)
@needs_small_host
def test_eval_batch_that_does_not_fit_is_refused_before_training(shared, tmp_path):
    workdir = tmp_path / "run"
    out = _run(
        workdir,
        shared,
        "--config.train.steps=4",
        f"--config.train.eval_batch_size={BIG_EVAL_BATCH}",
        devices=1,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    lines = _error_lines(out)
    assert (
        len(lines) == 1 and f"--config.train.eval_batch_size={BIG_EVAL_BATCH} needs" in (lines[0])
    ), lines
    fit = int(re.search(r"use --config.train.eval_batch_size=(\d+)", lines[0]).group(1))
    with open("/proc/meminfo") as f:
        ram = int(next(x for x in f if x.startswith("MemTotal")).split()[1]) * 1024
    assert 0 < fit < BIG_EVAL_BATCH and fit * 64 * 512 * 4 < ram  # its logits fit
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


@pytest.mark.slow  # make test-all; the suite's time budget
@needs_small_host
def test_eval_out_of_memory_keeps_the_final_checkpoint_in_one_line(shared, tmp_path):
    """pmap has no ahead-of-time memory check: the eval after the last step really runs
    out of memory. The last step's checkpoint is written first."""
    workdir = tmp_path / "run"
    out = _run(
        workdir,
        shared,
        "--config.parallel.mode=pmap",
        "--config.train.steps=4",
        "--config.train.checkpoint_every=2",
        "--config.train.eval_every=4",
        f"--config.train.eval_batch_size={BIG_EVAL_BATCH}",
        devices=1,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith(("error", "warning"))]
    assert (
        len(errors) == 1 and "out of device memory in the held-out eval at step 4" in (errors[0])
    ), errors
    assert "lower --config.train.eval_batch_size" in errors[0]
    assert _steps(workdir) == [2, 4]
    assert max(r["step"] for r in _records(workdir)) == 4
