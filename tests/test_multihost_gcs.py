"""A pod's job on a bucket: two `jax.distributed` processes train with a gs:// workdir.

What a pod does, on one machine: `launch.local` starts 2 processes x 4 CPU devices (each
with its own HOME and caches, as hosts would have), their --workdir a gs:// prefix on a
real GCS JSON API server (tests/gcs_emulator.py, in this process; the children find it
through the environment its `env()` names). The job stops part way
(`--config.train.stop_at_step`) and is run again to the end. The oracles are independent
of the code under test: one process with all 8 devices and a local workdir must log the
same losses and held-out bits per byte as the bucket's metrics.jsonl; the bucket's own
listing (gcsfs, not the project's checkpoint code) must show every kept step committed
with Orbax's commit_success.txt; the emulator's request log must show process 0's
shared-workdir probe written, read back by process 1 (process 0 never reads it) and
removed, and lock.json created if absent and deleted, in both jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.parse import unquote

import pytest
from test_multihost import ROOT, _close, _env, _write_text

from gopher import paths

pytest.importorskip("gcp_storage_emulator", reason="pip install -e .[dev]")
import gcs_emulator  # noqa: E402 (tests/ is on sys.path; needs the emulator package)

STEPS, STOP, EVERY = 10, 5, 3  # STOP is no multiple of EVERY: the stop saves its own step
RUN = "gs://bucket/pod/run"


@pytest.fixture()
def emulator():
    emu = gcs_emulator.Emulator(bucket="bucket").start()
    with pytest.MonkeyPatch.context() as mp:  # for reading the bucket back from here
        for k, v in emu.env().items():
            mp.setenv(k, v)
        yield emu
    emu.stop()


def _args(workdir, shared, *overrides):
    return [
        "-m",
        "experiments.train",
        "--config=experiments/configs/gopher.py:test",
        f"--workdir={workdir}",
        "--config.data.source=files",
        f"--config.data.paths={shared}/text",
        "--config.data.heldout_fraction=0.1",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        f"--config.train.eval_every={STOP}",
        "--config.train.eval_batches=2",
        f"--config.train.checkpoint_every={EVERY}",
        "--config.train.tensorboard=false",
        "--config.train.peak_flops=1e12",  # not measured: seconds of matmuls per run
        "--config.parallel.data=4",
        "--config.parallel.model=2",
        *overrides,
    ]


def _launch(emu, logdir, shared, *overrides) -> str:
    """A 2-process job on the bucket, as a pod runs it; returns its prefixed output."""
    env = _env(8, **emu.env())
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)  # the emulator needs none
    job = subprocess.run(
        [sys.executable, "-m", "launch.local", "--processes=2", "--devices-per-process=4"]
        + [f"--logdir={logdir}", "--", "python"]
        + _args(RUN, shared, *overrides),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stdout[-4000:]
    return job.stdout


def _records(lines, kind) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in map(json.loads, lines):
        if r["kind"] == kind:
            out.setdefault(r["step"], []).append(r)
    return out


def _traffic(requests, key_part: str) -> dict[str, list[str]]:
    """What a job did to each object whose name holds `key_part`, in order: "create"
    (an upload that must find no object), "write" (another upload; a resumable one is
    two requests), "read" (a download of its content), "delete"."""
    seen: dict[str, list[str]] = {}
    for r in requests:
        name = r.query.get("name", [""])[0] or unquote(r.path.rsplit("/o/", 1)[-1])
        if key_part not in name:
            continue
        if r.method == "POST" and "upload" in r.path:
            what = "create" if r.query.get("ifGenerationMatch") == ["0"] else "write"
        elif r.method == "GET" and r.query.get("alt") == ["media"]:
            what = "read"
        elif r.method == "DELETE":
            what = "delete"
        else:  # metadata and listings
            continue
        ops = seen.setdefault(name.rsplit("/", 1)[-1], [])
        if not ops or ops[-1] != what:
            ops.append(what)
    return seen


@pytest.mark.slow  # 35 s: `make test-all` (the suite's own gs:// resume is tests/test_gcs.py)
def test_two_processes_train_and_resume_on_a_bucket(emulator, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    _write_text(shared, 0.3)
    fs = paths.gcs_filesystem()
    bucket_run = RUN[len("gs://") :]

    jobs = []
    for i, overrides in enumerate([(f"--config.train.stop_at_step={STOP}",), ()]):
        mark = len(emulator.requests)
        out = _launch(emulator, tmp_path / f"logs-{i}", shared, *overrides)
        jobs.append(out)
        fs.invalidate_cache()  # the job changed the bucket behind this process's listings
        # check_shared passed on both processes: process 0 wrote its probe, process 1 read
        # it back (process 0 never reads it), process 0 removed it; one probe per job.
        traffic = _traffic(emulator.requests[mark:], "/.shared-probe-")
        assert list(traffic.values()) == [["write", "read", "delete"]], (traffic, out[-3000:])
        # Process 0 took the lock (create-if-absent) and released it at the end.
        # (The heartbeat, every 30 s, may rewrite it meanwhile.)
        (lock,) = _traffic(emulator.requests[mark:], "/lock.json").values()
        assert lock in (["create", "delete"], ["create", "write", "delete"]), lock
        assert not fs.exists(f"{bucket_run}/lock.json"), "the job left its lock"
    assert "taking over" not in jobs[1]  # the first job's lock was released, not stale
    assert f"resumed from checkpoint step {STOP}" in jobs[1]

    # Every step directory in the bucket is a committed Orbax step (max_to_keep=3).
    steps = sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{bucket_run}/checkpoints"))
    assert steps == [6, 9, 10], steps
    for step in steps:
        assert fs.exists(f"{bucket_run}/checkpoints/{step}/commit_success.txt"), step
    assert not [p for p in fs.ls(bucket_run) if ".shared-probe-" in p]

    # The oracle: one process, 8 devices, a local workdir, the same tokenizer (the one
    # process 0 trained into the bucket), 10 steps in one go.
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(fs.cat(f"{bucket_run}/tokenizer.model"))
    ref = subprocess.run(
        [sys.executable]
        + _args(tmp_path / "reference", shared, f"--config.data.tokenizer_path={tokenizer}"),
        cwd=ROOT,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_lines = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    lines = fs.cat(f"{bucket_run}/metrics.jsonl").decode().splitlines()
    ref_train, train = _records(ref_lines, "train"), _records(lines, "train")
    assert sorted(train) == list(range(1, STEPS + 1))
    for step, recs in train.items():  # each step logged once: the stop saved step 5
        assert len(recs) == 1, (step, recs)
        assert _close(recs[0]["loss"], ref_train[step][0]["loss"]), (step, recs, ref_train[step])
    ref_eval, evals = _records(ref_lines, "eval"), _records(lines, "eval")
    assert sorted(evals) == [STOP, STEPS]
    for step in (STOP, STEPS):
        got, want = evals[step][0]["heldout_bpb"], ref_eval[step][0]["heldout_bpb"]
        assert _close(got, want), (step, got, want)
