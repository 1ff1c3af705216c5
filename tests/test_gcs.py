"""gs:// workdirs against a real GCS JSON API server on 127.0.0.1 (tests/gcs_emulator.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import unquote

import numpy as np
import pytest

from gopher import metrics as metrics_lib
from gopher import paths
from gopher import workdir as workdir_lib
from gopher.workdir_lock import WorkdirLock, WorkdirLocked

pytest.importorskip("gcp_storage_emulator", reason="pip install -e .[dev]")
import gcs_emulator  # noqa: E402 (tests/ is on sys.path; needs the emulator package)


@pytest.fixture(scope="module")
def emulator():
    emu = gcs_emulator.Emulator(bucket="bucket").start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in emu.env().items():
            mp.setenv(k, v)
        yield emu
    emu.stop()


def _uploads(emu, start: int, key_part: str) -> list:
    return [
        r
        for r in emu.requests[start:]
        if r.method == "POST" and "upload" in r.path and key_part in r.query.get("name", [""])[0]
    ]


def test_paths_read_write_list_on_gcs(emulator):
    run = paths.resolve("gs://bucket/paths/run")
    (run / "a.txt").write_text("hello")
    paths.write_atomic("gs://bucket/paths/run/sub/b.bin", b"\x00\x01")
    assert (run / "a.txt").read_text() == "hello" and (run / "a.txt").exists()
    assert (run / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in run.iterdir()) == ["a.txt", "sub"]
    assert not (run / "missing").exists()
    content, generation = paths.read("gs://bucket/paths/run/a.txt")
    assert (
        content == b"hello"
        and generation == paths.stat("gs://bucket/paths/run/a.txt")["generation"]
    )


def test_append_text_keeps_every_line_on_gcs(emulator, tmp_path):
    """The quarantine record's appends: gcsfs's "a" mode would overwrite on GCS (the
    emulator is a real GCS JSON API); compose keeps every line, as a local file does."""
    for target in ("gs://bucket/append/quarantine.jsonl", str(tmp_path / "quarantine.jsonl")):
        for i in range(3):
            paths.append_text(target, json.dumps({"step": i}) + "\n")
        lines = paths.resolve(target).read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [0, 1, 2], target


def test_check_writable_and_record_config_on_gcs(emulator):
    workdir_lib.check_writable("gs://bucket/cfg/run")
    with pytest.raises(ValueError, match="gs://no-such-bucket does not exist"):
        workdir_lib.check_writable("gs://no-such-bucket/run")
    config = {"model": {"d_model": 8}, "train": {"steps": 1}}
    workdir_lib.record_config("gs://bucket/cfg/run", config)
    workdir_lib.record_config("gs://bucket/cfg/run", {**config, "train": {"steps": 9}})
    saved = json.loads(paths.resolve("gs://bucket/cfg/run/config.json").read_text())
    assert saved["train"]["steps"] == 9
    with pytest.raises(ValueError, match="different experiment"):
        workdir_lib.record_config("gs://bucket/cfg/run", {**config, "model": {"d_model": 16}})
    # The probe object is gone and no temporary object was left beside config.json.
    assert [p.name for p in paths.resolve("gs://bucket/cfg/run").iterdir()] == ["config.json"]


def test_probe_whose_first_create_landed_is_no_refusal(emulator, monkeypatch):
    """gcsfs retries a create whose reply was lost; when the first try had landed, the
    retry's ifGenerationMatch=0 gets 412 on our own probe: the bucket is writable."""
    import types
    import uuid

    token = uuid.UUID(int=7)
    monkeypatch.setattr(paths, "uuid", types.SimpleNamespace(uuid4=lambda: token))
    probe = f"gs://bucket/probe-retry/.write-test-{token.hex[:12]}"
    paths.write(probe, b"gopher write test")  # the first try, landed
    workdir_lib.check_writable("gs://bucket/probe-retry")
    assert paths.stat(probe) is None  # and removed


def _fake_lock(url, host, heartbeat_age_s):
    info = {
        "host": host,
        "pid": 4242,
        "start_time": 1.7e9,
        "heartbeat_time": time.time() - heartbeat_age_s,
        "run_id": "someone-else",
    }
    return paths.write(url, json.dumps(info).encode())


def test_gcs_lock_refuses_second_holder_and_releases(emulator):
    workdir = "gs://bucket/lock1"
    with WorkdirLock(workdir, heartbeat_s=3600) as lock:
        content, generation = paths.read(lock.path)
        assert json.loads(content)["run_id"] == lock.run_id
        first = [r for r in emulator.requests if r.query.get("name") == ["lock1/lock.json"]]
        assert first[0].query["ifGenerationMatch"] == ["0"]  # create-if-absent
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()}"):
            WorkdirLock(workdir).acquire()
        assert paths.read(lock.path)[1] == generation  # the refused run changed nothing
    assert paths.stat("gs://bucket/lock1/lock.json") is None


def test_gcs_lock_stale_takeover_by_generation(emulator):
    url = "gs://bucket/lock2/lock.json"
    stale = _fake_lock(url, "other-host.example", heartbeat_age_s=3600)
    said = []
    mark = len(emulator.requests)
    lock = WorkdirLock("gs://bucket/lock2", heartbeat_s=3600, say=said.append).acquire()
    assert said and "taking over" in said[0] and "other-host.example" in said[0]
    preconditions = [r.query["ifGenerationMatch"] for r in _uploads(emulator, mark, "lock.json")]
    assert preconditions == [["0"], [str(stale)]]  # refused create, then the generation
    # Someone replaced it meanwhile: release must leave their lock alone.
    theirs = _fake_lock(url, "other-host.example", heartbeat_age_s=0)
    lock.release()
    assert paths.read(url)[1] == theirs
    # A fresh heartbeat from another host is a live run.
    with pytest.raises(WorkdirLocked, match="other-host.example"):
        WorkdirLock("gs://bucket/lock2").acquire()


def test_gcs_lock_racing_takeovers_exactly_one_wins(emulator):
    _fake_lock("gs://bucket/lock3/lock.json", "other-host.example", heartbeat_age_s=3600)
    results, said, barrier = [], [], threading.Barrier(4)

    def contend():
        barrier.wait()
        try:
            results.append(
                WorkdirLock("gs://bucket/lock3", heartbeat_s=3600, say=said.append).acquire()
            )
        except WorkdirLocked:
            results.append(None)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and len(said) == 1
    winners[0].release()


def test_gcs_lock_heartbeat_rewrites_with_generation(emulator):
    lock = WorkdirLock("gs://bucket/lock4", heartbeat_s=0.1).acquire()
    try:
        first = paths.read(lock.path)
        time.sleep(0.6)
        second = paths.read(lock.path)
        assert second[1] != first[1]
        assert json.loads(second[0])["heartbeat_time"] > json.loads(first[0])["heartbeat_time"]
        assert not lock.lost
    finally:
        lock.release()


def test_gcs_heartbeat_whose_first_try_landed_keeps_the_lock(emulator):
    """gcsfs retries a write whose reply was lost; if the first try landed, the retry's
    generation precondition fails on the lock's own record. That is not a takeover (the
    run would stop at its next checkpoint without saving, exit 2)."""
    lock = WorkdirLock("gs://bucket/lock-retry", heartbeat_s=3600).acquire()
    try:
        _, generation = paths.read(lock.path)
        # The first try of a beat that landed (its reply lost): our record, a new generation.
        landed = paths.write(lock.path, lock._record(), if_generation_match=generation)
        assert lock._beat_gcs() and lock._generation == landed  # adopted: release works
        # Another run's record in its place is a takeover.
        other = json.dumps({**json.loads(lock._record()), "run_id": "another"}).encode()
        paths.write(lock.path, other, if_generation_match=lock._generation)
        assert not lock._beat_gcs()
    finally:
        lock.release()


def _read_events(raw: bytes, tmp_path) -> list:
    """Our event file through TensorBoard's own reader, which checks every CRC."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    local = tmp_path / "events.out.tfevents.copy"
    local.write_bytes(raw)
    return list(EventFileLoader(str(local)).Load())


def test_metrics_writer_appends_to_gcs_by_compose(emulator, tmp_path):
    workdir = "gs://bucket/metrics/run"
    writer = metrics_lib.MetricsWriter(workdir, flush_every_s=3600)
    mark = len(emulator.requests)
    for step in (1, 2, 3):
        writer.write({"step": step, "kind": "train", "loss": 1.0 / step, "lr": np.float32(0.1)})
        writer.flush()
    jsonl = _uploads(emulator, mark, "metrics.jsonl")
    composes = [r for r in emulator.requests[mark:] if r.path.endswith("metrics.jsonl/compose")]
    assert jsonl[0].query["ifGenerationMatch"] == ["0"] and len(composes) == 2
    assert all("ifGenerationMatch" in r.query for r in composes)
    before = len(emulator.requests)
    for step in (4, 5):  # buffered: no request until close
        writer.write({"step": step, "kind": "train", "loss": 0.1})
    assert len(emulator.requests) == before
    writer.close()
    lines = paths.resolve(f"{workdir}/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5]
    # One upload per flush holding just that flush's line: never the whole file again.
    assert [r.body_bytes for r in jsonl] == [len(x) + 1 for x in lines[:3]]
    # A resumed run appends to the same object.
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=False)
    writer.write({"step": 6, "kind": "eval", "heldout_bpb": 2.0})
    writer.close()
    lines = paths.resolve(f"{workdir}/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert not any(".append-" in p.name for p in paths.resolve(workdir).iterdir())

    (events_file,) = list(paths.resolve(f"{workdir}/tensorboard").iterdir())
    events = _read_events(events_file.read_bytes(), tmp_path)
    from tensorboard.util import tensor_util

    assert events[0].file_version == "brain.Event:2"
    # TensorBoard's loader turns scalar summaries into tensors (its data_compat step).
    scalars = {
        (e.step, v.tag): tensor_util.make_ndarray(v.tensor).item()
        for e in events[1:]
        for v in e.summary.value
    }
    assert scalars[(3, "train/loss")] == pytest.approx(1 / 3)
    assert scalars[(2, "train/lr")] == pytest.approx(0.1)
    assert sorted({s for s, _ in scalars}) == [1, 2, 3, 4, 5]


def test_orbax_checkpoint_manager_on_gcs(emulator):
    """Orbax 0.12.8 saves and restores through tensorstore's GCS driver (the emulator)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.arange(3, dtype=jnp.int32)}
    with ocp.CheckpointManager("gs://bucket/ckpt", options=ocp.CheckpointManagerOptions()) as m:
        m.save(7, args=ocp.args.StandardSave(tree))
        m.wait_until_finished()
    with ocp.CheckpointManager("gs://bucket/ckpt") as m:
        assert m.all_steps() == [7]
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = m.restore(7, args=ocp.args.StandardRestore(abstract))
    for k in tree:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(tree[k]))
    assert paths.resolve("gs://bucket/ckpt/7/_CHECKPOINT_METADATA").exists()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_cmd(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={ROOT}/experiments/configs/gopher.py:test",
        f"--workdir={workdir}",
        "--config.data.source=stdlib",
        "--config.train.steps=20",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=5",
        *overrides,
    ]


def _losses(lines):
    out = {}
    for r in map(json.loads, lines):
        if r["kind"] == "train":
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def test_train_on_gcs_resumes(emulator, tmp_path):
    """20 steps on gs://, SIGKILLed while writing checkpoint 15, resumed: bit-identical."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, HOME=str(home), JAX_PLATFORMS="cpu")
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    cache = f"--config.data.cache_dir={home}/.cache/gopher/tokens"  # where gs:// runs cache
    ref = subprocess.run(
        _train_cmd(tmp_path / "reference", cache), cwd=cwd, env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _losses((tmp_path / "reference" / "metrics.jsonl").read_text().splitlines())

    workdir = "gs://bucket/train/run"
    proc = subprocess.Popen(_train_cmd(workdir), cwd=cwd, env=env, stderr=subprocess.PIPE)

    def kill_during_checkpoint_15(request):
        if "train/run/checkpoints/15" in unquote(request.path + str(request.query)):
            proc.send_signal(signal.SIGKILL)

    emulator.on_request = kill_during_checkpoint_15
    try:
        proc.wait(timeout=300)
    finally:
        emulator.on_request = None
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    assert paths.resolve(f"{workdir}/lock.json").exists()  # the killed run's lock is left

    out = subprocess.run(_train_cmd(workdir), cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "warning: taking over" in out.stderr and "no longer exists" in out.stderr
    run = paths.resolve(workdir)
    got = _losses((run / "metrics.jsonl").read_text().splitlines())
    assert sorted(got) == list(range(1, 21))
    for step, losses in got.items():  # a step redone after the kill is logged twice
        assert all(x == reference[step][0] for x in losses), (step, losses, reference[step])
    names = {p.name for p in run.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "tokenizer.model",
        "tensorboard",
        "checkpoints",
    } <= names
    assert "lock.json" not in names  # released at the end
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in home.iterdir()) == [".cache"]  # nothing local but caches


def test_damaged_step_is_quarantined_on_gcs(emulator):
    """GCS has no empty folders: the move into a fresh quarantine/ prefix failed (exit 4,
    final under supervise), so a pod could never resume from its previous good step."""
    import jax.numpy as jnp

    from gopher import checkpoint as checkpoint_lib

    directory = "gs://bucket/quarantine-run/checkpoints"
    ck = checkpoint_lib.Checkpointer(directory, async_save=False, retry_backoff_s=0.0)
    for step in (10, 20):
        assert ck.save(step, {"w": jnp.full((4,), float(step))}, {"step": step})
    ck.close()
    fs = paths.gcs_filesystem()
    state_files = [f for f in fs.find(f"{directory}/20/state") if "/d/" in f or "ocdbt" in f]
    assert state_files
    for f in state_files:  # damage: the array data of step 20 gone, its commit marker kept
        fs.rm(f)
    abstract = {"w": jax_struct((4,))}
    ck = checkpoint_lib.Checkpointer(directory, async_save=False, retry_backoff_s=0.0)
    step, state, _ = ck.restore_latest(abstract)
    ck.close()
    assert step == 10 and float(state["w"][0]) == 10.0
    quarantine = paths.resolve("gs://bucket/quarantine-run/quarantine/checkpoints")
    (moved,) = [p.name for p in quarantine.iterdir()]
    assert moved.startswith("20-") and not fs.exists(f"{directory}/20")
    assert fs.exists(f"{quarantine}/{moved}/_CHECKPOINT_METADATA")
    record, _ = paths.read(f"{directory}/quarantine.jsonl")
    (line,) = record.decode().splitlines()
    assert json.loads(line)["step"] == 20


def test_a_step_without_its_commit_marker_is_no_checkpoint_on_gcs(emulator):
    """On gs:// Orbax writes straight into <step>/ and commits it last with
    commit_success.txt; a save cut before that is no checkpoint (Orbax's own listing is
    the oracle): it neither makes the workdir refuse another experiment nor counts as
    work a restart_from_scratch must leave for a new directory. With the marker it is.
    (checkpoint_directory itself is not called: the emulator lacks GCS's moveTo, and
    gcsfs's retries before its fallback take 34 s a record.)"""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from gopher import checkpoint as checkpoint_lib

    workdir = "gs://bucket/uncommitted"
    directory = f"{workdir}/checkpoints"
    ck = checkpoint_lib.Checkpointer(directory, async_save=False)
    assert ck.save(5, {"w": jnp.zeros((4,))}, {"step": 5})
    ck.close()
    marker = f"{directory}/5/commit_success.txt"
    content, _ = paths.read(marker)  # where Orbax puts it
    paths.delete(marker)  # the save was cut before its commit
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)

    def orbax_steps():
        with ocp.CheckpointManager(directory, options=options) as m:
            return m.all_steps()

    def step_dirs():  # what checkpoint_directory's restart_from_scratch counts as work
        return [p.name for p in checkpoint_lib.step_dirs(paths.resolve(directory))]

    config = {"model": {"d_model": 8}, "train": {"steps": 10}}
    other = {**config, "model": {"d_model": 16}}
    workdir_lib.record_config(workdir, config)
    assert orbax_steps() == [] and paths.resolve(f"{directory}/5").is_dir()
    assert workdir_lib.kept_checkpoints(workdir) == []
    said = []
    workdir_lib.check_config(workdir, other, said.append)  # nothing kept: replaced
    assert len(said) == 1 and "keeps no checkpoint" in said[0]
    assert step_dirs() == []

    paths.write(marker, content)  # committed
    assert orbax_steps() == [5]
    assert workdir_lib.kept_checkpoints(workdir) == ["checkpoints/ step 5"]
    with pytest.raises(ValueError, match="different experiment .* with checkpoints"):
        workdir_lib.check_config(workdir, other, said.append)
    assert step_dirs() == ["5"]


def jax_struct(shape):
    import jax
    import jax.numpy as jnp

    return jax.ShapeDtypeStruct(shape, jnp.float32)
