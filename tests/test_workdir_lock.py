"""The workdir lock on a local disk: refusal, stale takeover, release, races."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from gopher import workdir as workdir_lib
from gopher import workdir_lock
from gopher.workdir_lock import WorkdirLock, WorkdirLocked


def _fake_lock(workdir, host, pid, heartbeat_age_s, start_time=1.7e9):
    info = {
        "host": host,
        "pid": pid,
        "start_time": start_time,
        "heartbeat_time": time.time() - heartbeat_age_s,
        "run_id": "someone-else",
    }
    (workdir / "lock.json").write_text(json.dumps(info))
    return info


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(p.stdout)  # exited and reaped: the pid names no process


def test_second_run_refused_with_holder_named(tmp_path):
    with WorkdirLock(str(tmp_path)) as first:
        info = json.loads((tmp_path / "lock.json").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["run_id"] == first.run_id
        with pytest.raises(WorkdirLocked) as e:
            WorkdirLock(str(tmp_path)).acquire()
        msg = str(e.value)
        assert "\n" not in msg
        assert socket.gethostname() in msg and f"pid {os.getpid()}" in msg
        assert time.strftime("%Y-%m-%d", time.gmtime(info["start_time"])) in msg
        assert "--workdir" in msg
        assert isinstance(e.value, ValueError)  # the CLI's one-line exit 2
    assert not (tmp_path / "lock.json").exists()


def test_lock_of_dead_pid_taken_over_with_warning(tmp_path):
    _fake_lock(tmp_path, socket.gethostname(), _dead_pid(), heartbeat_age_s=1)
    said = []
    lock = WorkdirLock(str(tmp_path), say=said.append).acquire()
    try:
        assert len(said) == 1 and said[0].startswith("warning: taking over")
        assert "no longer exists" in said[0]
        assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == lock.run_id
    finally:
        lock.release()


def test_lock_of_a_zombie_is_taken_over(tmp_path):
    # a SIGKILLed trainer whose parent died first lingers as a zombie where the container's
    # init does not reap: kill(pid, 0) still succeeds, yet the process holds nothing
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while time.time() < deadline:  # exited but not waited for: a zombie
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.02)
    try:
        os.kill(child.pid, 0)  # the pid still exists
        assert not workdir_lock._pid_alive(child.pid)
        assert workdir_lock._pid_alive(os.getpid())
        _fake_lock(tmp_path, socket.gethostname(), child.pid, heartbeat_age_s=1)
        said = []
        WorkdirLock(str(tmp_path), say=said.append).acquire().release()
        assert len(said) == 1 and "no longer exists" in said[0]
    finally:
        child.wait()


def test_lock_of_a_reused_pid_is_taken_over_only_when_older_than_us(tmp_path):
    """A restarted container numbers its processes from 1 again, so a dead run's lock (same
    host, fresh heartbeat) can name our own pid: it was taken before this process started
    and is stale. A lock this process took (another WorkdirLock in it) stays alive."""
    host, me = socket.gethostname(), os.getpid()
    _fake_lock(tmp_path, host, me, heartbeat_age_s=1)  # taken in 2023, beating still
    said = []
    lock = WorkdirLock(str(tmp_path), say=said.append).acquire()
    try:
        assert len(said) == 1 and said[0].startswith("warning: taking over"), said
        assert f"pid {me}" in said[0]
        assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == lock.run_id
    finally:
        lock.release()
    _fake_lock(tmp_path, host, me, heartbeat_age_s=1, start_time=time.time() - 1)  # ours
    with pytest.raises(WorkdirLocked, match=f"pid {me}"):
        WorkdirLock(str(tmp_path)).acquire()


def test_other_host_lock_stale_after_heartbeat_timeout(tmp_path):
    _fake_lock(tmp_path, "other-host.example", 12345, heartbeat_age_s=120)
    said = []
    with WorkdirLock(str(tmp_path), stale_after_s=60, say=said.append) as lock:
        assert "no heartbeat for 2.0 min" in said[0] and "other-host.example" in said[0]
        assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == lock.run_id


def test_other_host_lock_with_fresh_heartbeat_refused(tmp_path):
    # pid 1 exists here, but on another host a pid says nothing: only the heartbeat does.
    _fake_lock(tmp_path, "other-host.example", _dead_pid(), heartbeat_age_s=5)
    with pytest.raises(WorkdirLocked, match="other-host.example"):
        WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
    assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == "someone-else"


def test_release_removes_only_our_own_lock(tmp_path):
    lock = WorkdirLock(str(tmp_path), heartbeat_s=3600).acquire()
    # Someone replaced it (e.g. took it over while we were stopped): not ours to delete.
    _fake_lock(tmp_path, "other-host.example", 1, heartbeat_age_s=0)
    lock.release()
    assert json.loads((tmp_path / "lock.json").read_text())["run_id"] == "someone-else"


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    said = []
    lock = WorkdirLock(str(tmp_path), heartbeat_s=0.05, say=said.append).acquire()
    try:
        first = json.loads((tmp_path / "lock.json").read_text())["heartbeat_time"]
        time.sleep(0.3)
        info = json.loads((tmp_path / "lock.json").read_text())
        assert info["heartbeat_time"] > first and info["start_time"] == lock.start_time
        with workdir_lock._guard(lock._guard_path):  # as a takeover would
            _fake_lock(tmp_path, "other-host.example", 1, heartbeat_age_s=0)
        time.sleep(0.3)
        assert lock.lost and any("taken over" in s for s in said)
    finally:
        lock.release()
    assert (tmp_path / "lock.json").exists()  # the other run's lock stays


def test_threads_racing_exactly_one_wins(tmp_path):
    results, barrier = [], threading.Barrier(8)

    def contend():
        barrier.wait()
        try:
            results.append(WorkdirLock(str(tmp_path), heartbeat_s=3600).acquire())
        except WorkdirLocked:
            results.append(None)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    winners[0].release()


_CONTEND = """
import sys, time
from gopher.workdir_lock import WorkdirLock, WorkdirLocked
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    WorkdirLock(sys.argv[1], heartbeat_s=3600).acquire()
    print("won", flush=True)
    time.sleep(2)
except WorkdirLocked:
    print("refused", flush=True)
"""


@pytest.mark.parametrize("stale", [False, True])
def test_processes_racing_exactly_one_wins(tmp_path, stale):
    if stale:  # all of them find a dead run's lock and try to take it over at once
        _fake_lock(tmp_path, socket.gethostname(), _dead_pid(), heartbeat_age_s=1)
    go = time.time() + 1.5
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(workdir_lib.__file__))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTEND, str(tmp_path), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=30) for p in procs]
    verdicts = sorted(o[0].strip() for o in outs)
    assert verdicts == ["refused"] * 3 + ["won"], outs
    takeovers = sum("taking over" in o[1] for o in outs)
    assert takeovers == (1 if stale else 0)


# ---- the recorded experiment (config.json) ------------------------------------------

_CONFIG = {
    "model": {"d_model": 8, "num_layers": 2},
    "train": {"steps": 10},
    "data": {"source": "files", "paths": ["/data/a"]},
}


def _with(section, **fields):
    return {**_CONFIG, section: {**_CONFIG[section], **fields}}


def _recorded(workdir):
    return json.loads((workdir / "config.json").read_text())


def test_untrained_workdir_takes_another_experiment_one_with_checkpoints_refuses(tmp_path):
    workdir_lib.record_config(str(tmp_path), _CONFIG)  # a run that failed before any step
    said = []
    other = _with("model", num_layers=3)
    workdir_lib.check_config(str(tmp_path), other, said.append)
    assert len(said) == 1 and "model.num_layers: 2 -> 3" in said[0] and "replaces" in said[0]
    workdir_lib.record_config(str(tmp_path), other, replace_untrained=True)
    assert _recorded(tmp_path)["model"]["num_layers"] == 3
    # Callers that do not ask for it keep the strict check.
    with pytest.raises(ValueError, match="different experiment"):
        workdir_lib.record_config(str(tmp_path), _CONFIG)
    # A committed step (an Orbax tmp directory is not one), or a quarantined one: refused.
    (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    workdir_lib.record_config(str(tmp_path), _CONFIG, replace_untrained=True)
    for kept in ["checkpoints-1/5", "quarantine/checkpoints/5-20250101T000000"]:
        (tmp_path / kept).mkdir(parents=True)
        for call in (
            lambda: workdir_lib.check_config(str(tmp_path), other, said.append),
            lambda: workdir_lib.record_config(str(tmp_path), other, replace_untrained=True),
        ):
            with pytest.raises(ValueError, match="different experiment .* with checkpoints"):
                call()
        assert _recorded(tmp_path)["model"]["num_layers"] == 2
        shutil.rmtree(tmp_path / kept.split("/")[0])


def test_data_paths_may_move_but_the_data_sha256_may_not_change(tmp_path):
    moved = _with("data", paths=["/elsewhere/a"])
    # Recorded without a data sha256 (an older run) and with checkpoints: paths may not change.
    workdir_lib.record_config(str(tmp_path), _CONFIG)
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(ValueError, match="data.paths"):
        workdir_lib.check_config(str(tmp_path), moved, print)
    workdir_lib.record_config(str(tmp_path), _CONFIG, data_sha256="a" * 64)
    workdir_lib.check_config(str(tmp_path), moved, print)  # now it may: the sha guards
    workdir_lib.check_data(str(tmp_path), moved, "a" * 64)
    workdir_lib.record_config(str(tmp_path), moved, data_sha256="a" * 64, replace_untrained=True)
    assert _recorded(tmp_path)["data"]["paths"] == ["/elsewhere/a"]
    assert _recorded(tmp_path)["data_sha256"] == "a" * 64
    for call in (
        lambda: workdir_lib.check_data(str(tmp_path), moved, "b" * 64),
        lambda: workdir_lib.record_config(str(tmp_path), moved, "b" * 64, replace_untrained=True),
    ):
        with pytest.raises(ValueError, match="not the data .* aaaaaaaaaaaa -> bbbbbbbbbbbb"):
            call()
    assert _recorded(tmp_path)["data_sha256"] == "a" * 64
    # Without checkpoints other data is no bar (nothing trained on the old data was kept).
    shutil.rmtree(tmp_path / "checkpoints")
    workdir_lib.record_config(str(tmp_path), moved, "b" * 64, replace_untrained=True)
    assert _recorded(tmp_path)["data_sha256"] == "b" * 64
