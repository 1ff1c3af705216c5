"""The run directory: writable, one place for every host, holding this experiment and no other.

WORKDIR/config.json records the experiment. A restart with the same workdir must be
the same experiment (model, data, optimiser recipe, seed; the parallel layout may change);
fields that only change cadence or length (steps, logging, eval, checkpoint cadence)
may differ, so a run can be extended. Beside the config it records `data_sha256`, the
sha256 of the data the run trains on (gopher/data/pipeline.py data_fingerprint: the
tokens of every train and held-out document after the split, or the embedded corpus's
manifest: each source's document, byte and token counts and the tokenizer's sha256, which
the token files are checked against when they load), so `data.paths` may change (the data
moved) while different data is refused.

The training loop checks the config before it sets a run up (`check_config`) and writes
it only once the run is set up (`record_config`), so a run that failed before that
leaves nothing behind. A workdir that holds no checkpoint (nothing trained was kept)
takes a different experiment's config; one with checkpoints refuses it. A job of several
processes first checks that they all see the same workdir (`check_shared`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

from gopher import paths

# Fields a restart may change without making it a different experiment.
MUTABLE = {
    "model": {"attention"},  # the kernel or the XLA path: the same maths
    "train": {
        "steps",  # extending a run is allowed (the cosine then stretches from here on)
        "stop_at_step",
        "log_every",
        "eval_every",
        "eval_batches",
        "eval_batch_size",
        "unroll_layers",  # how the step is compiled, not what it computes
        "checkpoint_every",
        "max_to_keep",
        "async_checkpoint",
        "max_bad_steps",
        "inject_nan_steps",
        "profile_steps",
        "peak_flops",
        "tensorboard",
        "remat",
        "restart_from_scratch",
        "watchdog_s",
    },
    "parallel": {"mode", "replica", "data", "model", "zero", "device_order"},
    # paths: where the files are, not what they hold; data_sha256 guards that (with a
    # config.json recorded without one, paths may not change either)
    "data": {"cache_dir", "paths"},
}
DATA_SHA256 = "data_sha256"  # config.json's top-level key: sha256 of the data trained on
HELDOUT_SHA256 = "heldout_sha256"  # and of the held-out documents (stdlib / files sources)


def check_writable(workdir: str) -> None:
    """Creates the workdir (local) or checks credentials and write access (gs://).

    Raises a one-line ValueError naming the workdir and the fix.
    """
    if paths.is_gcs(workdir):
        paths.check_access(workdir)
        return
    if paths.is_remote(workdir):
        raise ValueError(f"workdir {workdir!r}: only local paths and gs:// URLs are supported")
    try:
        os.makedirs(paths.resolve(workdir), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=paths.resolve(workdir), prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you can write to"
        ) from None


SHARED_PROBE_WAIT_S = 5.0  # how long a host looks for process 0's probe (NFS caches)
_probes = 0  # check_shared calls so far: each exchanges under keys of its own


def check_shared(workdir: str, wait_s: float = SHARED_PROBE_WAIT_S) -> None:
    """With several processes: refuses a workdir that is not one place for all of them.

    Orbax commits a multi-host checkpoint on process 0, so each host's shards must land
    where process 0 looks: on a pod a local --workdir is each worker's own disk, where
    no step would ever be complete and hosts would resume from different steps. Process
    0 writes a probe file named by a random token that it shares through the
    coordination service; every process must read it back (within `wait_s`), then it is
    removed. Otherwise a one-line ValueError (the CLI's exit 2) on every process.
    """
    import jax

    from gopher import distributed

    if jax.process_count() <= 1:
        return
    global _probes
    _probes += 1
    me, key = jax.process_index(), f"workdir-probe/{_probes}"
    root = paths.resolve(workdir)
    token, error = (uuid.uuid4().hex if me == 0 else ""), ""
    if me == 0:
        try:
            paths.write_atomic(root / f".shared-probe-{token}", token.encode())
        except OSError as e:  # rare after check_writable; the others must not wait for us
            token, error = "", f" ({e})"
    token = distributed.exchange(f"{key}/token", token, what="reach the workdir check")[0]
    if not token:
        raise ValueError(
            f"--workdir={workdir}: process 0 could not write a probe file there{error}; "
            "pass a --workdir every host can write to"
        )
    probe = root / f".shared-probe-{token}"
    seen = me == 0 or _sees(probe, token, wait_s)
    seen_by = distributed.exchange(f"{key}/seen", str(int(seen)), what="check the workdir")
    if me == 0:  # every process has looked
        with contextlib.suppress(OSError):
            probe.unlink()
    blind = [p for p, s in enumerate(seen_by) if s != "1"]
    if blind:
        raise ValueError(
            f"--workdir={workdir} is not shared between the hosts (process {blind[0]} cannot "
            "see process 0's files): use a gs:// workdir or a shared filesystem"
        )


def _sees(probe, token: str, wait_s: float) -> bool:
    """Whether `probe` holds `token`, looking again for up to `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):  # not there (yet)
            if probe.read_text() == token:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    sections = {k for k in set(old) | set(new) if isinstance(old.get(k, new.get(k)), dict)}
    for section in sorted(sections):
        a, b = old.get(section, {}), new.get(section, {})
        mutable = MUTABLE.get(section, set())
        if section == "data" and not old.get(DATA_SHA256):
            mutable = mutable - {"paths"}  # nothing recorded to check the data against
        for key in sorted(set(a) | set(b)):
            if key in mutable:
                continue
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def kept_checkpoints(workdir: str) -> list[str]:
    """What WORKDIR keeps of a run's training: each checkpoint directory with committed
    steps (WORKDIR/checkpoints, or checkpoints-K after a restart_from_scratch) and each
    quarantined step, as short descriptions; [] when it keeps none."""
    from gopher.checkpoint import step_dirs  # imports jax and Orbax, which callers have

    root = paths.resolve(workdir)
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir(), key=lambda p: p.name):
        name = d.name
        if name == "checkpoints" or (name.startswith("checkpoints-") and name[12:].isdigit()):
            steps = sorted(int(p.name) for p in step_dirs(d))
            if steps:
                span = f"{steps[0]}..{steps[-1]}" if len(steps) > 1 else f"{steps[0]}"
                found.append(f"{name}/ step{'s' * (len(steps) > 1)} {span}")
        elif name == "quarantine" and d.is_dir():
            moved = [f"{s.name}/{p.name}" for s in d.iterdir() if s.is_dir() for p in s.iterdir()]
            if moved:
                found.append(f"quarantine/ {', '.join(sorted(moved)[:3])}")
    return found


def read_record(workdir: str) -> dict | None:
    """WORKDIR/config.json as recorded (with data_sha256, heldout_sha256), or None."""
    path = paths.resolve(workdir) / "config.json"
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} is unreadable ({e}); restore it or use a new --workdir") from None
    return old


def _refuse(workdir: str, diff: list[str], kept: list[str]) -> ValueError:
    return ValueError(
        f"workdir {workdir!r} holds a different experiment ({'; '.join(diff[:3])}) with "
        f"checkpoints ({'; '.join(kept)}); use a new --workdir or the same config"
    )


def _check_data(workdir: str, old: dict, config: dict, data_sha256: str | None) -> None:
    """Refuses data other than what the workdir's checkpoints were trained on."""
    was = old.get(DATA_SHA256)
    if data_sha256 and was and was != data_sha256 and kept_checkpoints(workdir):
        data = config.get("data", {})
        a, b = old.get("data", {}).get("paths"), data.get("paths")
        if data.get("source") == "files":
            where = f"data.paths {a!r} -> {b!r}" if a != b else f"data.paths {b!r}"
            fix = "point --config.data.paths at that run's data, or use a new --workdir"
        else:
            where = f"data.source {data.get('source')!r}"
            fix = "use that run's data, or a new --workdir"
        raise ValueError(
            f"the data ({where}) is not the data workdir {workdir!r} was trained on (sha256 "
            f"{was[:12]} -> {data_sha256[:12]}: files added, removed, renamed or edited); {fix}"
        )


def check_config(workdir: str, config: dict, say: Callable[[str], None] = print) -> None:
    """Before a run is set up: refuses a different experiment in a workdir that keeps
    checkpoints; for one that keeps none, says in one line that this run's config will
    replace the recorded one (the run that wrote it kept nothing)."""
    old = read_record(workdir)
    if old is None:
        return
    diff = _differences(old, json.loads(json.dumps(config, sort_keys=True)))
    if not diff:
        return
    kept = kept_checkpoints(workdir)
    if kept:
        raise _refuse(workdir, diff, kept)
    say(
        f"note: workdir {workdir!r} keeps no checkpoint, so this run's config replaces its "
        f"config.json ({'; '.join(diff[:3])})"
    )


def check_data(workdir: str, config: dict, data_sha256: str) -> None:
    """Refuses data other than what the workdir's checkpoints were trained on (the sha256
    recorded in config.json); data a workdir without checkpoints recorded is no bar."""
    old = read_record(workdir)
    if old is not None:
        _check_data(workdir, old, json.loads(json.dumps(config, sort_keys=True)), data_sha256)


def record_config(
    workdir: str,
    config: dict,
    data_sha256: str | None = None,
    replace_untrained: bool = False,
    heldout_sha256: str | None = None,
) -> None:
    """Writes config.json (with `data_sha256`), or checks that an existing one is the
    same experiment first. `replace_untrained`: a workdir that keeps no checkpoint takes
    the new config whatever the old one was (the training loop, after check_config)."""
    path = paths.resolve(workdir) / "config.json"
    # Round-trip through JSON so tuples and lists compare equal.
    config = json.loads(json.dumps(config, sort_keys=True))
    old = read_record(workdir)
    if old is not None:
        _check_data(workdir, old, config, data_sha256)
        diff = _differences(old, config)
        if diff and not replace_untrained:
            raise ValueError(
                f"workdir {workdir!r} holds a different experiment ({'; '.join(diff[:3])}); "
                "use a new --workdir or the same config"
            )
        kept = kept_checkpoints(workdir) if diff else []
        if kept:
            raise _refuse(workdir, diff, kept)
        data_sha256 = data_sha256 or (None if diff else old.get(DATA_SHA256))
        heldout_sha256 = heldout_sha256 or (None if diff else old.get(HELDOUT_SHA256))
    if data_sha256:
        config[DATA_SHA256] = data_sha256
    if heldout_sha256:
        config[HELDOUT_SHA256] = heldout_sha256
    paths.write_atomic(path, json.dumps(config, indent=2, sort_keys=True).encode())


# ---- the workdir lock ---------------------------------------------------------------

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
