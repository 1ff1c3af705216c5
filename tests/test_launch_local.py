"""launch.local's own logic (which status it reports, what it prints, its signals), with
stand-in processes that start in milliseconds; test_multihost.py runs real jobs through it.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launch import local


def job(tmp_path: Path, body: str, processes: int = 2) -> tuple[local.Job, io.StringIO]:
    """A job whose processes run `body` (GOPHER_PROCESS_ID tells them apart)."""
    out = io.StringIO()
    prelude = "import os, signal, sys, time; i = int(os.environ['GOPHER_PROCESS_ID'])\n"
    argv = ["python", "-c", prelude + body]
    return local.Job(argv, processes, 1, str(tmp_path / "logs"), port=1, out=out), out


def test_the_status_is_the_first_failure_in_time_not_in_process_order(tmp_path: Path) -> None:
    """Process 1 is killed (137); process 0 notices later and exits 6 ("peer lost"): the
    job's status is the victim's, though process 0 comes first in order."""
    j, out = job(tmp_path, "time.sleep(1.0) if i == 0 else os.kill(os.getpid(), 9); sys.exit(6)")
    j.start()
    assert j.wait(grace_s=30) == 137, out.getvalue()
    assert "process 0: 6, process 1: -9" in out.getvalue()


def test_the_stopping_message_is_printed_once(tmp_path: Path) -> None:
    """Process 0 fails; process 1 outlives the grace period and, as a process stuck in a
    device call can, takes a while to go after the kill (here: the kill does nothing and
    it exits by itself 1.5 s later). The launcher says it is stopping them once."""
    j, out = job(tmp_path, "time.sleep(1.5) if i else sys.exit(3)")
    kills: list[int] = []
    j.signal_all = kills.append  # the SIGKILL that does not take effect at once
    j.start()
    assert j.wait(grace_s=0.1, poll_s=0.05) == 3
    assert out.getvalue().count("stopping the processes") == 1
    assert len(kills) > 3 and set(kills) == {signal.SIGKILL}  # it kept trying


def test_a_ctrl_c_while_starting_reaches_the_started_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C right after the first process starts: the launcher must not die of it (its
    processes run in their own sessions and would be orphaned): it passes the signal on,
    starts no more, and reports the interrupted status."""
    real_popen, started = subprocess.Popen, []

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        signal.raise_signal(signal.SIGINT)  # its handler runs before Popen returns
        return started[-1]

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    before = signal.getsignal(signal.SIGINT)
    argv = ["--processes=2", "--devices-per-process=1", f"--logdir={tmp_path}", "--"]
    try:
        status = local.main([*argv, "python", "-c", "import time; time.sleep(30)"])
    except KeyboardInterrupt:
        pytest.fail("the launcher died of a Ctrl-C during start-up")
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert status == 130 and len(started) == 1, capsys.readouterr().out
    assert started[0].returncode == -signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # main leaves the handlers as they were


def test_a_second_ctrl_c_kills_the_processes(tmp_path: Path) -> None:
    """The first SIGINT is passed on (these processes ignore it); the second kills them."""
    j, out = job(tmp_path, "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(30)")
    j.start()
    for delay in (0.5, 1.0):
        threading.Timer(delay, j.on_signal, (signal.SIGINT, None)).start()
    assert j.wait(grace_s=30) == 137
    assert j.received == [signal.SIGINT, signal.SIGKILL]


def test_command_for_runs_this_interpreter() -> None:
    assert local.command_for(["python", "-c", "x"]) == [sys.executable, "-c", "x"]
