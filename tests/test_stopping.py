"""The hang watchdog: a step that takes too long gets every thread's stack dumped."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_watchdog_dumps_every_threads_stack_when_a_step_hangs():
    code = (
        "import threading, time\n"
        "from gopher.stopping import Watchdog\n"
        "def stuck_in_io():\n"
        "    time.sleep(30)\n"
        "threading.Thread(target=stuck_in_io, name='io', daemon=True).start()\n"
        "with Watchdog(1.0) as w:\n"
        "    w.tick(7)\n"
        "    time.sleep(3)\n"
        "    w.tick(8)\n"
        "    time.sleep(0.5)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    # One dump for the hang after step 7 (not one every poll), none after step 8.
    assert out.stderr.count("watchdog: no step finished") == 1, out.stderr
    assert "after step 7" in out.stderr
    assert "stuck_in_io" in out.stderr  # the other thread's stack is in the dump too


def test_a_failing_cleanup_neither_skips_the_rest_nor_replaces_the_stop(tmp_path):
    """On preemption the run raises Stopped(75) and closes its parts: a metrics flush to
    storage that fails must not turn 75 into another status, nor leave the checkpointer
    (a save in flight) or the workdir lock (a rerun would wait for it) unclosed."""
    import pytest

    from gopher import loop, workdir_lock

    closed, said = [], []

    class Part:
        def __init__(self, name, fails=False):
            self.name, self.fails = name, fails

        def close(self):
            closed.append(self.name)
            if self.fails:
                raise OSError(f"{self.name}: the storage is gone")

    lock = workdir_lock.WorkdirLock(str(tmp_path))
    lock.acquire()
    with pytest.raises(loop.Stopped) as stop:
        try:
            raise loop.Stopped(75)
        finally:
            loop._close(Part("metrics", fails=True), Part("checkpointer"), lock, said.append)
    assert stop.value.code == 75
    assert closed == ["checkpointer", "metrics"] and said == [
        "warning: closing the metrics failed: metrics: the storage is gone"
    ]
    assert not os.path.exists(os.path.join(tmp_path, workdir_lock.LOCK_FILE))  # released
