"""Each bad input gets one line naming the value and the fix; nothing on disk is lost."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *flags, devices=8, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        "--config=experiments/configs/gopher.py:test",
        f"--workdir={workdir}",
        "--config.train.batch_size=8",
        *flags,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 20-step run whose workdir the cases below must not damage."""
    d = tmp_path_factory.mktemp("trained")
    workdir = d / "run"
    out = _train(
        workdir,
        "--config.train.steps=20",
        "--config.train.checkpoint_every=10",
        f"--config.data.cache_dir={d}/cache",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir, d / "cache"


def _snapshot(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def test_mesh_not_matching_device_count(tmp_path):
    out = _train(tmp_path, "--config.parallel.data=3", "--config.parallel.model=2")
    _one_line_error(out, "3*2 = 6 but 8 devices", "--config.parallel.data=4")


def test_batch_not_divisible_by_data_axis(tmp_path):
    out = _train(tmp_path, "--config.train.batch_size=6")
    _one_line_error(out, "global batch 6", "--config.train.batch_size=8")


@pytest.mark.slow  # make test-all; the suite's time budget
def test_seq_len_too_long_for_memory(tmp_path):
    out = _train(tmp_path, "--config.model.seq_len=65536", devices=1)
    _one_line_error(out, "seq_len 65536", "GiB", "--config.model.seq_len")


def test_missing_and_empty_data_path(tmp_path):
    out = _train(
        tmp_path / "w1", "--config.data.source=files", f"--config.data.paths={tmp_path}/nope"
    )
    _one_line_error(out, "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    out = _train(
        tmp_path / "w2", "--config.data.source=files", f"--config.data.paths={tmp_path}/empty"
    )
    _one_line_error(out, "empty")


@pytest.mark.slow  # make test-all; the suite's time budget
def test_tokenizer_mismatch_with_checkpoint(trained, tmp_path):
    workdir, cache = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    # Another tokenizer of the same size, trained on different text.
    other = tmp_path / "other.model"
    code = (
        "from gopher.data import Tokenizer, stdlib_documents; "
        f"Tokenizer.train([d.text[::-1] for d in stdlib_documents()[:200]], 512, {str(other)!r})"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=ROOT)
    )
    shutil.copy(other, copy / "tokenizer.model")
    before = _snapshot(copy / "checkpoints")
    out = _train(
        copy,
        "--config.train.steps=30",
        "--config.train.checkpoint_every=10",
        f"--config.data.cache_dir={cache}",
    )
    _one_line_error(out, "tokenizer", "new --workdir")
    assert _snapshot(copy / "checkpoints") == before


def test_workdir_with_a_different_experiment(trained, tmp_path):
    workdir, cache = trained
    before = _snapshot(workdir)
    out = _train(
        workdir,
        "--config.train.steps=20",
        "--config.train.checkpoint_every=10",
        "--config.train.max_lr=0.1",
        f"--config.data.cache_dir={cache}",
    )
    _one_line_error(out, "different experiment", "train.max_lr")
    assert _snapshot(workdir) == before


def test_unwritable_workdir(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/gopher-run"  # even root cannot create files here
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    out = _train(target)
    _one_line_error(out, "not writable", "--workdir")


def test_full_disk_while_checkpointing_keeps_previous(trained, tmp_path):
    workdir, cache = trained
    size = sum(len(v) for v in _snapshot(workdir / "checkpoints" / "20").values())
    mnt = tmp_path / "small"
    mnt.mkdir()
    # Room for the files already there and not much more than one more checkpoint's half.
    used = sum(len(v) for k, v in _snapshot(workdir).items() if not k.startswith("data"))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={used + size // 2}", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        run = mnt / "run"
        shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("data", "tensorboard"))
        before = _snapshot(run / "checkpoints" / "20")
        out = _train(
            run,
            "--config.train.steps=40",
            "--config.train.checkpoint_every=10",
            "--config.train.async_checkpoint=false",
            "--config.train.tensorboard=false",
            f"--config.data.cache_dir={cache}",
        )
        _one_line_error(out, "could not be written", "previous checkpoint")
        assert _snapshot(run / "checkpoints" / "20") == before
        meta = json.loads((run / "checkpoints" / "20" / "meta" / "metadata").read_text())
        assert meta["step"] == 20
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_one_text_file_trains_evaluates_and_resumes(tmp_path):
    """The commonest first run: one text file. Its tail is the held-out split (a file-level
    split has no second file); the run trains, scores it, and resumes."""
    from pydoc_data.topics import topics

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(topics[k] for k in sorted(topics))[:400_000])
    flags = [
        "--config.data.source=files",
        f"--config.data.paths={book}",
        "--config.train.eval_every=10",
        "--config.train.checkpoint_every=10",
    ]
    first = _train(tmp_path / "run", "--config.train.steps=10", *flags, devices=1)
    assert first.returncode == 0, first.stderr[-2000:]
    log = first.stdout + first.stderr
    assert "held-out split of files: inside files (1 file is too few" in log
    assert "step 10: held-out" in log
    again = _train(tmp_path / "run", "--config.train.steps=20", *flags, devices=1)
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert "resumed from checkpoint step 10" in log and "step 20: held-out" in log


@pytest.mark.parametrize(
    "flag,needles",
    [
        (
            "--config.model.batch_size=4",
            ["--config.model.batch_size=4", "--config.train.batch_size=4"],
        ),
        ("--config.model.precision=bf16", ["--config.train.precision=bf16"]),
        ("--config.data.paths=/nonexistent", ["--config.data.paths", "--config.data.source=files"]),
        (
            "--config.data.source=embedded --config.data.tokenizer_path=/x/t.model",
            ["--config.data.tokenizer_path=/x/t.model", "source is 'embedded'"],
        ),
        ("--config.train.stop_at_step=-5", ["stop_at_step = -5", "--config.train.stop_at_step"]),
        ("--config.train.warmup_init_lr=-1", ["--config.train.warmup_init_lr"]),
    ],
)
def test_overrides_nothing_would_read_are_one_line(tmp_path, flag, needles):
    out = _train(tmp_path / "run", *flag.split(" "))
    _one_line_error(out, *needles)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_config_file_is_named(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    for config in (f"--config={tmp_path}/nope.py:tiny", f"--config={tmp_path}"):
        cmd = [sys.executable, "-m", "experiments.train", config, f"--workdir={tmp_path}/w"]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        _one_line_error(out, f"config file {str(tmp_path)!r}"[:-1], "--config")
