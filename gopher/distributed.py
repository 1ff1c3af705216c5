"""Multi-host jobs: start-up, the chief process, agreement checks, and dead-peer detection.

A job is one process per host (a TPU VM worker, or a `launch.local` process on one
machine). `initialize()` joins the processes through `jax.distributed` when the job has
several: an explicit coordinator (`--coordinator_address` / `GOPHER_COORDINATOR_ADDRESS`,
with the process count and index) for CPU and GPU clusters, or a Cloud TPU VM pod, which
jax detects by itself. Afterwards every process sees every device; each feeds only the
batch rows its own devices hold (gopher/sharding.py `local_rows`).

What jax does not do here:
- Agreement: `check_same` refuses to start when processes were given different data
  (tokenizer, corpus manifest): they would train on different streams without an error.
- A dead peer: jax's coordination service notices a missing heartbeat only after its
  timeout and then aborts with a C++ stack trace. `PeerMonitor` keeps a heartbeat counter
  per process in the coordination service's key-value store; when a peer's counter stops
  for `peer_timeout_s`, or the coordinator itself is gone, the process exits with
  PEER_LOST_EXIT_CODE and one line saying which process stopped. A process that
  finished and leaves (`shutdown`) says so first: its silence is then no death.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time

import jax

PEER_LOST_EXIT_CODE = 6  # another process of the job died or hangs: restart the whole job

# jax's defaults (100 s heartbeat, 300 s shutdown) let a job hang for minutes after a
# process dies; ours notice within ~PEER_TIMEOUT_S (env GOPHER_PEER_TIMEOUT_S).
HEARTBEAT_TIMEOUT_S = 90
SHUTDOWN_TIMEOUT_S = 60
PEER_TIMEOUT_S = 45
STARTUP_TIMEOUT_S = 1800  # env GOPHER_STARTUP_TIMEOUT_S: see startup_timeout_s
BEAT_EVERY_S = 2.0


@dataclasses.dataclass(frozen=True)
class Job:
    process_index: int
    process_count: int
    coordinator: str | None  # None: one process, or addresses jax found by itself


_MONITOR: PeerMonitor | None = None


METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"


def _tpu_pod() -> bool:
    """A Cloud TPU slice of several hosts, whose coordinator jax finds by itself:
    GOPHER_TPU_POD=1 / 0 says so outright; else GKE's TPU_PROCESS_ADDRESSES or
    TPU_WORKER_HOSTNAMES lists several hosts, or a TPU VM's metadata server lists several
    workers (`worker-network-endpoints`, what `launch.tpu create` makes), or there are
    several slices (MEGASCALE_NUM_SLICES)."""
    env = os.environ
    said = env.get("GOPHER_TPU_POD", "").strip().lower()
    if said in ("1", "true", "yes", "0", "false", "no"):
        return said in ("1", "true", "yes")
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if len([h for h in env.get(name, "").split(",") if h.strip()]) > 1:
            return True
    if int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
        return True
    return tpu_vm_workers() > 1


def tpu_vm_workers(timeout_s: float = 5.0) -> int:
    """Workers in this Cloud TPU VM's slice from the metadata server; 0 off a TPU VM (no
    libtpu, or no metadata server: nothing is asked) or when the server does not answer."""
    if os.environ.get("TPU_SKIP_MDS_QUERY") is not None:
        return 0
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:  # jax moved it: the launcher's GOPHER_TPU_POD still decides
        return 0
    if not running_in_cloud_tpu_vm:
        return 0
    import urllib.request

    request = urllib.request.Request(
        f"{METADATA}/worker-network-endpoints", headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode()
    except OSError:
        return 0
    return len([w for w in text.split(",") if w.strip()])


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Job:
    """Joins the job's processes (before any other jax call); one process: does nothing."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("GOPHER_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("GOPHER_NUM_PROCESSES"):
        num_processes = int(env["GOPHER_NUM_PROCESSES"])
    if process_id is None and env.get("GOPHER_PROCESS_ID"):
        process_id = int(env["GOPHER_PROCESS_ID"])
    # A process index other than 0 means a job of several, even given alone.
    explicit = coordinator_address is not None or (num_processes or 1) > 1 or bool(process_id)
    if not explicit and not _tpu_pod():
        return Job(0, 1, None)
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError(
            f"a multi-process job needs a coordinator address, the process count and this "
            f"process's index (got {coordinator_address!r}, {num_processes!r}, {process_id!r}); "
            "pass all of --coordinator_address, --num_processes and --process_id"
        )
    if explicit and not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} is outside [0, {num_processes}); number the "
            "processes 0 .. num_processes - 1"
        )
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=int(env.get("GOPHER_INIT_TIMEOUT_S", 300)),
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
    job = Job(jax.process_index(), jax.process_count(), coordinator_address)
    global _MONITOR
    _MONITOR = PeerMonitor(job, float(env.get("GOPHER_PEER_TIMEOUT_S", PEER_TIMEOUT_S)))
    _MONITOR.start()
    return job


def shutdown(quiet: bool = False) -> None:
    """Stops the peer monitor, then leaves the job (waits up to SHUTDOWN_TIMEOUT_S for the
    others to leave too). `quiet`: on the way out after an error, ignore a failed leave.

    A clean leave is announced first: a peer still closing its run (process 0 flushing
    metrics to GCS) must not take this process's silence for a death and exit 6."""
    if _MONITOR is not None and not quiet:
        with contextlib.suppress(Exception):  # then the peers judge by the heartbeat alone
            _client().key_value_set(f"gopher/left/{jax.process_index()}", "1")
    stop_monitor()
    if _MONITOR is None:  # one process, or never joined
        return
    try:
        jax.distributed.shutdown()
    except Exception:
        if not quiet:
            raise


def stop_monitor() -> None:
    """Before an exit that other processes will also see: it is not a peer dying."""
    if _MONITOR is not None:
        _MONITOR.stop()


def _client():
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised")
    return client


def startup_timeout_s() -> float:
    """How long a process waits for the others at start-up (env GOPHER_STARTUP_TIMEOUT_S):
    process 0 builds the data first, which on a first run can take many minutes."""
    return float(os.environ.get("GOPHER_STARTUP_TIMEOUT_S", STARTUP_TIMEOUT_S))


def _timed_out(what: str, timeout_s: float, error: Exception) -> Exception:
    if "DEADLINE_EXCEEDED" not in str(error):
        return error
    return TimeoutError(
        f"the job's processes did not all {what} within {timeout_s:g} s (process 0 builds "
        "the data first); raise GOPHER_STARTUP_TIMEOUT_S, or build the data before the job "
        "(python -m experiments.prepare_data) and point every process at it"
    )


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Waits until every process reaches `name` (no device program involved)."""
    if jax.process_count() > 1:
        timeout_s = timeout_s or startup_timeout_s()
        try:
            _client().wait_at_barrier(f"gopher/{name}", int(timeout_s * 1000))
        except Exception as e:
            raise _timed_out(f"reach {name!r}", timeout_s, e) from e


def chief_first(name: str, fn):
    """Runs fn on process 0, then on the others (which may read what it wrote)."""
    if jax.process_index() == 0:
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


def exchange(key: str, value: str, timeout_s: float | None = None, what: str = "") -> list[str]:
    """Every process's `value` under `key`, in process order (each passes its own; a key
    is set once per job). Waits up to `timeout_s` (startup_timeout_s) for the others."""
    if jax.process_count() <= 1:
        return [str(value)]
    timeout_s = timeout_s or startup_timeout_s()
    client = _client()
    client.key_value_set(f"gopher/{key}/{jax.process_index()}", str(value))
    try:
        return [
            client.blocking_key_value_get(f"gopher/{key}/{p}", int(timeout_s * 1000))
            for p in range(jax.process_count())
        ]
    except Exception as e:
        raise _timed_out(what or f"report their {key}", timeout_s, e) from e


def check_same(values: dict[str, str], timeout_s: float | None = None) -> None:
    """Raises ValueError unless every process passed the same `values` as process 0."""
    if jax.process_count() <= 1:
        return
    me = jax.process_index()
    for name, value in values.items():
        ours = str(value)
        theirs = dict(enumerate(exchange(f"same/{name}", ours, timeout_s, f"report their {name}")))
        bad = {p: v for p, v in theirs.items() if v != theirs[0]}
        if bad:
            p, v = next(iter(bad.items()))
            raise ValueError(
                f"process {p}'s {name} is {v[:16]} but process 0's is {theirs[0][:16]} (this "
                f"is process {me}: {ours[:16]}); give every process the same data, e.g. build "
                "the corpus once before the job and pass --config.data.corpus_dir / "
                "--config.data.tokenizer_path"
            )


class PeerMonitor:
    """A heartbeat per process in the coordination service; exits when a peer stops."""

    def __init__(self, job: Job, peer_timeout_s: float, beat_every_s: float = BEAT_EVERY_S):
        self.job, self.timeout, self.every = job, peer_timeout_s, beat_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gopher-peer-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _fail(self, message: str) -> None:
        if self._stop.is_set():  # the job is ending on purpose
            return
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(PEER_LOST_EXIT_CODE)

    def _run(self) -> None:
        me, n = self.job.process_index, self.job.process_count
        seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
        beat = 0
        while not self._stop.wait(self.every):
            beat += 1
            try:
                client = _client()
                client.key_value_set(f"gopher/beat/{me}", str(beat), allow_overwrite=True)
                values = {p: _try_get(client, f"gopher/beat/{p}") for p in seen}
            except Exception as e:  # the coordinator (process 0) is unreachable
                where = self.job.coordinator or "process 0"
                self._fail(
                    f"process {me} lost the job's coordinator ({where}: "
                    f"{str(e).splitlines()[0][:120]}); process 0 probably died: see its log. "
                    f"Exiting with {PEER_LOST_EXIT_CODE}; restart the job to resume"
                )
                return
            now = time.monotonic()
            for p, value in values.items():
                if value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.timeout and _left(client, p):
                    del seen[p]  # it finished and is leaving the job: silent on purpose
                elif now - seen[p][1] > self.timeout:
                    self._fail(
                        f"process {p} has sent no heartbeat for {now - seen[p][1]:.0f} s "
                        f"(this is process {me}); it died or hangs: see its log. Exiting with "
                        f"{PEER_LOST_EXIT_CODE}; restart the job to resume"
                    )
                    return


def _left(client, p: int) -> bool:
    """Whether process p announced a clean leave (`shutdown`)."""
    try:
        return _try_get(client, f"gopher/left/{p}") is not None
    except Exception:  # the coordinator is gone: the next beat says so
        return False


def _try_get(client, key: str) -> str | None:
    """The key's value, or None when no process has written it yet."""
    try:
        return client.key_value_try_get(key)
    except Exception as e:
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise
