"""The workdir lock: one run at a time in a workdir (WORKDIR/lock.json).

Process 0 of a run holds it for the run's life and refreshes a heartbeat in it; a second
run on the same workdir is refused in one line (WorkdirLocked, exit 5) while the holder
lives, and takes over a lock whose holder is gone, with a warning. Works the same on a
local path and on gs:// (gopher/paths.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

from gopher import paths

LOCK_FILE = "lock.json"


class WorkdirLocked(ValueError):
    """Another live run holds the workdir (a ValueError: the CLI prints one line)."""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process on this host (a zombie is dead: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OverflowError, ValueError):
        return False
    try:  # a killed process whose parent died stays a zombie until init reaps it, and some
        # containers' init never does; /proc/PID/stat's state after the ')' is Z or X then
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _process_start_time() -> float | None:
    """When this process started (seconds since the epoch), from /proc; None without it."""
    try:
        with open("/proc/self/stat", "rb") as f:  # field 22, starttime: ticks after boot
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _parse(raw: bytes) -> dict:
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _guard(path: str):
    """Serialises takeover, heartbeat and release of one local lock file."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


class WorkdirLock:
    """WORKDIR/lock.json = {host, pid, start_time, heartbeat_time, run_id}: one run per workdir.

    `acquire()` creates the lock if absent (local: a hard link of a complete temporary
    file, which fails if the name exists, like O_CREAT|O_EXCL but never half-written;
    gs://: an upload with ifGenerationMatch=0). A lock whose holder is gone (same host:
    its pid does not exist, or is this process's own, reused by a restarted container,
    while the lock is older than this process; any host: no heartbeat for
    `stale_after_s`) is taken over with a warning: locally under an flock after
    re-reading it unchanged, on GCS with ifGenerationMatch=<the stale generation>, so of
    two runs taking over at once exactly one wins. A live holder makes `acquire()` raise
    WorkdirLocked at once. A daemon thread rewrites heartbeat_time every `heartbeat_s`;
    `lost` turns True if another run took the lock over meanwhile. `release()` removes
    the lock only if it is still ours.
    """

    def __init__(
        self,
        workdir: str,
        stale_after_s: float = 600.0,
        heartbeat_s: float = 30.0,
        run_id: str | None = None,
        say: Callable[[str], None] | None = None,
    ):
        self.workdir = workdir
        self.path = paths.join(workdir, LOCK_FILE)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.run_id = run_id or uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.start_time = 0.0
        self.held = False
        self.lost = False
        self._gcs = paths.is_gcs(workdir)
        self._generation: int | None = None  # GCS: the version of lock.json we wrote last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._say = say or (lambda m: print(m, file=sys.stderr, flush=True))

    # -- the record and its judgement

    def _record(self) -> bytes:
        info = {
            "host": self.host,
            "pid": self.pid,
            "start_time": self.start_time,
            "heartbeat_time": time.time(),
            "run_id": self.run_id,
        }
        return json.dumps(info, sort_keys=True).encode()

    def _stale_reason(self, info: dict) -> str | None:
        """Why a lock is abandoned, or None while its holder may be alive."""
        if not info:
            return "the lock file is unreadable"
        age = time.time() - float(info.get("heartbeat_time") or 0)
        pid = int(info.get("pid") or -1)
        if info.get("host") == self.host and not _pid_alive(pid):
            return f"pid {info.get('pid')} no longer exists on {self.host}"
        if info.get("host") == self.host and pid == self.pid and self._before_us(info):
            # A restarted container numbers its processes from 1 again: the dead run's pid
            # can be ours. A lock taken before this process started is not ours.
            return f"pid {pid} is now this process (the lock's run started before it)"
        if age > self.stale_after_s:
            return f"no heartbeat for {age / 60:.1f} min"
        return None

    def _before_us(self, info: dict) -> bool:
        """Whether the lock was taken before this process started (so not by it)."""
        started = _process_start_time()
        if started is None or info.get("run_id") == self.run_id:
            return False
        return float(info.get("start_time") or 0) < started - 1.0  # /proc's ticks: 10 ms

    def _locked(self, info: dict) -> WorkdirLocked:
        age = time.time() - float(info.get("heartbeat_time") or 0)
        return WorkdirLocked(
            f"workdir {self.workdir} is in use by host {info.get('host')} pid {info.get('pid')} "
            f"(started {_when(float(info.get('start_time') or 0))}, last heartbeat {age:.0f} s "
            f"ago); wait for that run to finish or stop it, or pass another --workdir "
            f"(a lock without heartbeat for {self.stale_after_s / 60:g} min is taken over)"
        )

    def _took_over(self, info: dict, reason: str) -> None:
        self._say(
            f"warning: taking over {self.path} from host {info.get('host')} pid "
            f"{info.get('pid')} (started {_when(float(info.get('start_time') or 0))}): {reason}"
        )

    # -- public API

    def acquire(self) -> WorkdirLock:
        """Takes the lock or raises WorkdirLocked; starts the heartbeat thread."""
        if self.held:
            return self
        self.start_time = time.time()
        for _ in range(5):  # only a lock that keeps changing under us needs another look
            if self._acquire_gcs() if self._gcs else self._acquire_local():
                self.held, self.lost = True, False
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._heartbeat_loop, name="workdir-lock-heartbeat", daemon=True
                )
                self._thread.start()
                return self
        raise WorkdirLocked(f"{self.path} keeps changing; is another run starting? try again")

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None
        if not self.held:
            return
        self.held = False
        if self._gcs:
            paths.delete(self.path, if_generation_match=self._generation)
            return
        with _guard(self._guard_path):
            if self._ours(_read_local(self.path)):
                os.unlink(self.path)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local files

    @property
    def _guard_path(self) -> str:
        return os.path.join(os.path.dirname(self.path), f".{LOCK_FILE}.guard")

    def _ours(self, raw: bytes | None) -> bool:
        info = _parse(raw or b"")
        return info.get("run_id") == self.run_id and info.get("pid") == self.pid

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{self.run_id[:8]}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._record())
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _acquire_local(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)  # atomic create-if-absent, content complete
            return True
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        raw = _read_local(self.path)
        if raw is None:  # released meanwhile: try again
            return False
        info = _parse(raw)
        reason = self._stale_reason(info)
        if reason is None:
            raise self._locked(info)
        with _guard(self._guard_path):
            if _read_local(self.path) != raw:  # another run got there first: judge again
                return False
            os.replace(self._write_tmp(), self.path)
        self._took_over(info, reason)
        return True

    def _beat_local(self) -> bool:
        with _guard(self._guard_path):
            if not self._ours(_read_local(self.path)):
                return False
            os.replace(self._write_tmp(), self.path)
        return True

    # -- GCS objects

    def _acquire_gcs(self) -> bool:
        try:
            self._generation = paths.write(self.path, self._record(), if_generation_match=0)
            return True
        except FileExistsError:
            pass
        got = paths.read(self.path)
        if got is None:
            return False
        raw, generation = got
        info = _parse(raw)
        if info.get("run_id") == self.run_id:  # our own create, retried after a lost reply
            self._generation = generation
            return True
        reason = self._stale_reason(info)
        if reason is None:
            raise self._locked(info)
        try:
            self._generation = paths.write(
                self.path, self._record(), if_generation_match=generation
            )
        except FileExistsError:  # another run took it over first: judge again
            return False
        self._took_over(info, reason)
        return True

    def _beat_gcs(self) -> bool:
        try:
            self._generation = paths.write(
                self.path, self._record(), if_generation_match=self._generation
            )
        except FileExistsError:
            # gcsfs retries a write whose reply was lost; when the first try had landed,
            # the retry's precondition fails on our own record: still ours, not taken over.
            got = paths.read(self.path)
            if got is None or _parse(got[0]).get("run_id") != self.run_id:
                return False
            self._generation = got[1]
        return True

    # -- heartbeat

    def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                ok = self._beat_gcs() if self._gcs else self._beat_local()
                failures = 0
            except Exception as e:  # a network blip must not kill the run; say so once
                failures += 1
                if failures == 1:
                    self._say(f"warning: heartbeat of {self.path} failed ({e}); retrying")
                continue
            if not ok:
                self.lost, self.held = True, False
                self._say(
                    f"warning: {self.path} was taken over by another run; this run no "
                    "longer holds the workdir"
                )
                return
