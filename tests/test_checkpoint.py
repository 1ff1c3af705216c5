"""Restore policy: retries, quarantine, RestoreFailed, and the restart_from_scratch directory.

Small pytrees sharded over the 8 simulated CPU devices, saved by the real Orbax manager;
damage is done to the files on disk, and every check of "nothing lost" compares the bytes.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gopher import checkpoint as checkpoint_lib
from tests.test_evaluate import _tree

MESH = Mesh(np.array(jax.devices()), ("d",))
SHARDED = NamedSharding(MESH, P("d"))


def _state(step: int) -> dict:
    w = jnp.arange(64, dtype=jnp.float32).reshape(16, 4) + step
    return {"w": jax.device_put(w, SHARDED), "step": jnp.int32(step)}


def _abstract() -> dict:
    return {
        "w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=SHARDED),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }


def _checkpointer(directory, **kw) -> checkpoint_lib.Checkpointer:
    kw.setdefault("retry_backoff_s", 0.0)
    return checkpoint_lib.Checkpointer(str(directory), async_save=False, **kw)


def _save_steps(directory, steps, **kw) -> None:
    ck = _checkpointer(directory, **kw)
    for s in steps:
        assert ck.save(s, _state(s), {"step": s})
    ck.close()


def _files(root) -> dict:
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _truncate_state(step_dir) -> None:
    for dirpath, _, names in os.walk(os.path.join(step_dir, "state")):
        for name in names:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.truncate(0)


def test_every_step_unreadable_raises_naming_each_and_moves_nothing(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10, 20, 30])
    for s in (10, 20, 30):
        _truncate_state(directory / str(s))
    before = _files(tmp_path)
    ck = _checkpointer(directory)
    with pytest.raises(checkpoint_lib.RestoreFailed) as err:
        ck.restore_latest(_abstract())
    ck.close()
    msg = str(err.value)
    assert "\n" not in msg
    for s in (10, 20, 30):
        assert f"step {s} (" in msg
    assert "restart_from_scratch=true" in msg and "nothing was moved" in msg
    assert _files(tmp_path) == before  # same paths, same bytes


def test_corrupt_newest_is_quarantined_and_its_step_number_saved_again(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10, 20, 30])
    _truncate_state(directory / "30")
    damaged = _files(directory / "30")
    ck = _checkpointer(directory, max_to_keep=3)
    step, state, meta = ck.restore_latest(_abstract())
    assert step == 20 and meta == {"step": 20}
    np.testing.assert_array_equal(state["w"], _state(20)["w"])
    assert state["w"].sharding.is_equivalent_to(SHARDED, 2)
    # Step 30 moved, byte for byte, out of Orbax's directory.
    (moved,) = os.listdir(tmp_path / "quarantine" / "checkpoints")
    assert moved.startswith("30-")
    assert _files(tmp_path / "quarantine" / "checkpoints" / moved) == damaged
    assert ck.steps() == [10, 20] and not (directory / "30").exists()
    (line,) = (directory / "quarantine.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["step"] == 30 and "damaged" in entry["error"] and entry["time"]
    # Training on: step 30 is free again, and max_to_keep's GC leaves the quarantine be.
    for s in (30, 40, 50):
        assert ck.save(s, _state(s), {"step": s})
    ck.wait()
    assert ck.steps() == [30, 40, 50]
    assert _files(tmp_path / "quarantine" / "checkpoints" / moved) == damaged
    got, _ = ck.restore(30, _abstract())
    np.testing.assert_array_equal(got["w"], _state(30)["w"])
    ck.close()
    # A fresh process sees the same: resumes from 50, never from the quarantined step.
    ck = _checkpointer(directory)
    assert ck.restore_latest(_abstract())[0] == 50
    ck.close()


def test_transient_errors_are_retried_then_restore(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10])
    ck = _checkpointer(directory, restore_tries=3)
    real, calls = ck._manager.restore, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("UNAVAILABLE: connection reset by the storage service")
        return real(*args, **kwargs)

    monkeypatch.setattr(ck._manager, "restore", flaky)
    step, state, _ = ck.restore_latest(_abstract())
    assert step == 10 and len(calls) == 3
    np.testing.assert_array_equal(state["w"], _state(10)["w"])
    ck.close()


def test_persistent_transient_error_stops_the_run_and_keeps_the_steps(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10, 20])
    before = _files(tmp_path)
    ck = _checkpointer(directory, restore_tries=2)
    calls = []

    def down(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while restoring")

    monkeypatch.setattr(ck._manager, "restore", down)
    with pytest.raises(checkpoint_lib.StorageUnavailable) as err:
        ck.restore_latest(_abstract())
    ck.close()
    assert len(calls) == 2  # the newest step's two tries; no older step is tried
    assert "step 20 in" in str(err.value) and "(transient, 2 tries" in str(err.value)
    assert _files(tmp_path) == before


def test_a_storage_outage_on_the_newest_step_does_not_resume_an_older_one(tmp_path, monkeypatch):
    """Step 20 is good, the storage fails its reads: resuming step 10 would quarantine
    20 and redo its steps. The run stops for a rerun, and nothing moves."""
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10, 20])
    before = _files(tmp_path)
    ck = _checkpointer(directory, restore_tries=2)
    real = ck._manager.restore

    def outage_on_20(step, *args, **kwargs):
        if step == 20:
            raise OSError("UNAVAILABLE: the storage service is not answering")
        return real(step, *args, **kwargs)

    monkeypatch.setattr(ck._manager, "restore", outage_on_20)
    with pytest.raises(checkpoint_lib.StorageUnavailable, match="run the same command"):
        ck.restore_latest(_abstract())
    ck.close()
    assert _files(tmp_path) == before and not (tmp_path / "quarantine").exists()
    # The storage back, the newest step restores.
    ck = _checkpointer(directory)
    assert ck.restore_latest(_abstract())[0] == 20
    ck.close()


def test_with_several_processes_a_host_never_falls_back_alone(tmp_path, monkeypatch):
    """Each host reads its own shards: one whose read of step 20 fails must not resume
    step 10 while the others resume 20. It stops the job; nothing is quarantined."""
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10, 20])
    _truncate_state(directory / "20")
    before = _files(tmp_path)
    monkeypatch.setattr(checkpoint_lib, "_several_processes", lambda: True)
    ck = _checkpointer(directory)
    with pytest.raises(checkpoint_lib.RestoreFailed, match=r"no\s+host resumes an older"):
        ck.restore_latest(_abstract())
    ck.close()
    assert _files(tmp_path) == before
    # One process (the same files): the damaged step is quarantined and 10 resumed.
    monkeypatch.setattr(checkpoint_lib, "_several_processes", lambda: False)
    ck = _checkpointer(directory)
    assert ck.restore_latest(_abstract())[0] == 10
    ck.close()


def test_only_quarantined_steps_left_is_not_a_fresh_start(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10, 20])
    _truncate_state(directory / "20")
    ck = _checkpointer(directory)
    assert ck.restore_latest(_abstract())[0] == 10
    ck.close()
    # Someone deletes the good step by hand: the quarantine still holds work.
    import shutil

    shutil.rmtree(directory / "10")
    ck = _checkpointer(directory)
    with pytest.raises(checkpoint_lib.RestoreFailed, match="quarantined") as e:
        ck.restore_latest(_abstract())
    ck.close()
    assert "--config.train.restart_from_scratch=true" in str(e.value)  # training's way on
    # evaluate and sample read only: training's flag is none of theirs.
    reader = checkpoint_lib.Checkpointer(str(directory), read_only=True)
    with pytest.raises(checkpoint_lib.RestoreFailed, match="quarantined") as e:
        reader.restore_latest(_abstract())
    reader.close()
    assert "restart_from_scratch" not in str(e.value) and "then rerun" in str(e.value)


def test_empty_directory_is_a_fresh_start(tmp_path):
    ck = _checkpointer(tmp_path / "checkpoints")
    assert ck.restore_latest(_abstract()) is None
    ck.close()


def test_classification_and_urls():
    assert checkpoint_lib.is_transient(OSError("connection reset"))
    assert checkpoint_lib.is_transient(TimeoutError())
    assert checkpoint_lib.is_transient(ValueError("DEADLINE_EXCEEDED: read took too long"))
    assert not checkpoint_lib.is_transient(FileNotFoundError("state/_METADATA"))
    assert not checkpoint_lib.is_transient(ValueError("Unexpected end of JSON input"))
    assert checkpoint_lib._absolute("gs://bucket/run/checkpoints") == "gs://bucket/run/checkpoints"
    assert checkpoint_lib._absolute("run/ck") == os.path.abspath("run/ck")


def test_a_workdir_under_home_is_one_place_for_checkpoints_and_run_files(tmp_path, monkeypatch):
    """The shell leaves --workdir=~/run unexpanded: the checkpoints went to ./~/run while
    the lock, config and metrics (paths.resolve) went to $HOME/run, so the check against
    another experiment's config looked where no checkpoint was."""
    from gopher import paths

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "home" / "run" / "checkpoints")
    assert checkpoint_lib.checkpoint_directory("~/run", False) == expected
    assert checkpoint_lib.active_checkpoint_directory("~/run") == expected
    assert str(paths.resolve("~/run") / "checkpoints") == expected
    assert not (tmp_path / "~").exists()


def test_restart_from_scratch_starts_a_new_directory_once(tmp_path):
    workdir = str(tmp_path / "run")
    first = checkpoint_lib.checkpoint_directory(workdir, False)
    assert first == os.path.join(workdir, "checkpoints")
    _save_steps(first, [10, 20])
    old = _files(first)

    new = checkpoint_lib.checkpoint_directory(workdir, True)
    assert new == os.path.join(workdir, "checkpoints-1")
    ck = _checkpointer(new)
    assert ck.restore_latest(_abstract()) is None  # from step 0
    ck.save(10, _state(10), {"step": 10})
    ck.close()
    # Preempted; the same command (flag still set) resumes in the new directory.
    again = checkpoint_lib.checkpoint_directory(workdir, True)
    assert again == new
    ck = _checkpointer(again)
    assert ck.restore_latest(_abstract())[0] == 10
    ck.close()
    assert _files(first) == old  # the old run's checkpoints, byte for byte
    record = json.loads((tmp_path / "run" / "checkpoints.json").read_text())
    assert record["active"] == "checkpoints-1"
    assert [h["directory"] for h in record["history"]] == ["checkpoints", "checkpoints-1"]

    # A run without the flag ends the restart; a later restart starts another directory.
    assert checkpoint_lib.checkpoint_directory(workdir, False) == new
    assert checkpoint_lib.checkpoint_directory(workdir, True) == os.path.join(
        workdir, "checkpoints-2"
    )
    assert checkpoint_lib.checkpoint_directory(workdir, True) == os.path.join(
        workdir, "checkpoints-2"
    )
    assert _files(first) == old


def test_restart_from_scratch_in_a_fresh_workdir_uses_the_default_directory(tmp_path):
    workdir = str(tmp_path / "run")
    got = checkpoint_lib.checkpoint_directory(workdir, True)
    assert got == os.path.join(workdir, "checkpoints")
    _save_steps(got, [10])
    assert checkpoint_lib.checkpoint_directory(workdir, True) == got  # rerun: resume


def test_active_checkpoint_directory_reads_the_record_and_writes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    _save_steps(checkpoint_lib.checkpoint_directory(workdir, False), [10])
    new = checkpoint_lib.checkpoint_directory(workdir, True)  # a restart, in progress
    before = _tree(tmp_path, skip=())
    assert checkpoint_lib.active_checkpoint_directory(workdir) == new
    assert _tree(tmp_path, skip=()) == before  # the latch stays set: same bytes, same mtime
    # ... so the rerun of the restart resumes in its directory instead of another one.
    assert checkpoint_lib.checkpoint_directory(workdir, True) == new
    # No record (a run that never restarted): the default directory, nothing created.
    fresh = str(tmp_path / "fresh")
    assert checkpoint_lib.active_checkpoint_directory(fresh) == os.path.join(fresh, "checkpoints")
    assert not os.path.exists(fresh)


def test_read_only_skips_a_damaged_step_with_one_line_and_moves_nothing(tmp_path, capfd):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [10, 20, 30])
    _truncate_state(directory / "30")
    # A save in flight in the training process: Orbax's tmp directory must survive.
    os.makedirs(directory / "40.orbax-checkpoint-tmp-1234567")
    before = _tree(tmp_path, skip=())
    ck = _checkpointer(directory, read_only=True)
    step, state, meta = ck.restore_latest(_abstract())
    assert step == 20 and meta == {"step": 20}
    np.testing.assert_array_equal(state["w"], _state(20)["w"])
    (line,) = capfd.readouterr().err.strip().splitlines()
    assert line.startswith("warning: skipped checkpoint step 30 (damaged: ")
    assert "loaded step 20" in line and "nothing was moved" in line
    with pytest.raises(checkpoint_lib.CheckpointError) as err:
        ck.restore_step(30, _abstract())  # asked for by number: an error, not a fallback
    assert "\n" not in str(err.value) and "step 30" in str(err.value)
    assert "damaged" in str(err.value) and "[10, 20]" in str(err.value)
    with pytest.raises(RuntimeError, match="read-only"):
        ck.save(50, _state(50), {"step": 50})
    ck.close()
    assert (
        _tree(tmp_path, skip=()) == before
    )  # no quarantine, no cleanup: same paths, bytes, mtimes


def test_a_model_of_another_shape_is_named_not_called_damaged(tmp_path):
    directory = tmp_path / "checkpoints"
    saved = {"num_layers": 2, "d_model": 64, "vocab_size": 512}
    ck = _checkpointer(directory)
    for s in (10, 20):
        assert ck.save(s, _state(s), {"step": s, "model": saved})
    ck.close()
    before = _files(tmp_path)
    wider = dict(_abstract(), w=jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=SHARDED))
    ck = _checkpointer(directory)
    with pytest.raises(checkpoint_lib.RestoreFailed) as err:
        ck.restore_latest(wider, model=dict(saved, num_layers=3))
    msg = str(err.value)
    assert err.value.other_shape and "damaged" not in msg and "\n" not in msg
    assert "steps 20, 10 each hold a model of another shape" in msg
    assert "(16, 4) where this model has (16, 8)" in msg and "num_layers=2 (this one 3)" in msg
    assert "restart_from_scratch" not in msg  # the fix is the config, not a new directory
    with pytest.raises(checkpoint_lib.CheckpointError, match="another shape"):
        ck.restore_step(10, wider)
    ck.close()
    assert _files(tmp_path) == before


def test_a_state_of_another_precision_is_named_not_called_damaged(tmp_path):
    """bf16_master keeps an fp32 master copy in the train state; restoring its steps as an
    fp32 run's state was called damaged, with a hint to fix the storage."""
    from gopher.train import TrainState

    def state(master):
        w = _state(5)["w"]
        return TrainState(w, None, master, jnp.int32(5), jnp.zeros(2, jnp.uint32), jnp.int32(0))

    directory = tmp_path / "checkpoints"
    ck = _checkpointer(directory)
    assert ck.save(5, state({"w": _state(5)["w"]}), {"step": 5})
    ck.close()
    before = _files(tmp_path)
    ck = _checkpointer(directory)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state(None))
    with pytest.raises(checkpoint_lib.RestoreFailed) as err:
        ck.restore_latest(abstract)
    msg = str(err.value)
    assert err.value.other_shape and "damaged" not in msg and "\n" not in msg
    assert "a state of another precision setting" in msg and "--config.train.precision" in msg
    assert "restart_from_scratch" not in msg
    ck.close()
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("directory", "error", "raised", "says"),
    [
        ("gs://bucket/run/checkpoints", OSError("Connection reset by peer"),
         checkpoint_lib.StorageUnavailable, "run the same command again"),
        ("/data/run/checkpoints", OSError(28, "No space left on device"),
         ValueError, "free disk space"),
    ],
)  # fmt: skip
def test_a_failed_save_says_what_it_takes(directory, error, raised, says):
    """A gs:// write that fails for the network is retried by a rerun (exit 7, which
    supervise retries), not called bad input (2, final); a full local disk still is."""
    from types import SimpleNamespace

    from gopher import config
    from gopher.saver import Saver

    def save(*args, **kwargs):
        raise error

    run = SimpleNamespace(
        ckpt=SimpleNamespace(directory=directory, save=save),
        writer=SimpleNamespace(flush=lambda: None),
        engine=SimpleNamespace(to_checkpoint=lambda state: state),
        data=SimpleNamespace(state=dict, tokenizer=SimpleNamespace(sha256="0" * 64)),
        model_cfg=config.get_preset("tiny"),
    )
    with pytest.raises(raised, match=says):
        Saver(run).save(10, {}, force=True)
