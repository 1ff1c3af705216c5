"""A real multi-process job on one machine, as a pod would run it, with CPU devices.

    python -m launch.local --processes=2 --devices-per-process=4 -- \\
        python -m experiments.train --config=experiments/configs/gopher.py:tiny \\
        --workdir=runs/mp --config.parallel.data=4 --config.parallel.model=2

starts the command N times. Each process is one "host": it joins the others through
`jax.distributed` (coordinator on a free localhost port; gloo collectives between the
processes), sees its own `--devices-per-process` CPU devices, and gets a HOME and caches
of its own, so that nothing passes between processes through a local folder (the workdir,
like a bucket, is shared). Every line a process prints is shown prefixed with `[i]` and
kept in LOGDIR/process-i.log.

When a process exits non-zero the others are given `--grace_s` to notice and exit on
their own (they do, with a clear message), then stopped. SIGTERM and the first SIGINT
are passed to every process (they checkpoint and exit); a second SIGINT stops them at
once. One that comes while the processes are starting reaches those already started, and
no more are started. The exit status is that of the process that failed first (a survivor's later
"peer lost" must not hide the victim's), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, index: int, count: int, devices: int, port: int, home: str) -> dict:
    """The environment of process `index`: its place in the job, its devices, its HOME."""
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={devices}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(
        GOPHER_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        GOPHER_NUM_PROCESSES=str(count),
        GOPHER_PROCESS_ID=str(index),
        HOME=home,
        XDG_CACHE_HOME=os.path.join(home, ".cache"),
        TMPDIR=os.path.join(home, "tmp"),
        PYTHONUNBUFFERED="1",
    )
    return env


def command_for(argv: list[str]) -> list[str]:
    """`python ...` runs this interpreter (a venv's python need not be on PATH)."""
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return list(argv)


class Job:
    """The processes of one job, their prefixed output, and their exit statuses."""

    def __init__(self, argv, processes, devices, logdir, port=None, out=sys.stdout):
        self.argv, self.count, self.devices = command_for(argv), processes, devices
        self.logdir, self.port, self.out = logdir, port or free_port(), out
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        self._print = threading.Lock()
        self.sigints = 0
        # Signals received, as sent on (a second SIGINT: SIGKILL), and how many of them each
        # process has been sent. The handler only records; the main thread forwards them
        # (`forward`), so a signal during start() reaches the processes started before it
        # exactly once and no process is started after it.
        self.received: list[int] = []
        self._sent: list[int] = []

    def start(self) -> None:
        os.makedirs(self.logdir, exist_ok=True)
        for i in range(self.count):
            if self.received:  # stopped while starting: start no more
                break
            home = os.path.join(self.logdir, f"host-{i}")
            os.makedirs(os.path.join(home, "tmp"), exist_ok=True)
            env = process_env(os.environ, i, self.count, self.devices, self.port, home)
            proc = subprocess.Popen(
                self.argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # signals reach it only through us
            )
            self.procs.append(proc)
            self._sent.append(0)
            self.forward()
            t = threading.Thread(target=self._pump, args=(i, proc), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, i: int, proc: subprocess.Popen) -> None:
        with open(os.path.join(self.logdir, f"process-{i}.log"), "wb") as log:
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                with self._print:
                    self.out.write(f"[{i}] {line.decode(errors='replace')}")
                    self.out.flush()

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    def forward(self) -> None:
        """Sends each process the received signals it has not been sent yet."""
        n = len(self.received)  # the handler may append meanwhile: those go next time
        for i, p in enumerate(self.procs):
            for sig in self.received[self._sent[i] : n]:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(sig)
            self._sent[i] = n

    def wait(self, grace_s: float = 150.0, poll_s: float = 0.2) -> int:
        """Waits for every process; after a failure, `grace_s` before stopping the rest.
        Returns the status of the process seen failing first (within `poll_s`)."""
        failed: list[int] = []  # process indices, in the order their failures were seen
        failed_at, said = None, False
        while True:
            self.forward()
            codes = [p.poll() for p in self.procs]
            failed += [i for i, c in enumerate(codes) if c not in (None, 0) and i not in failed]
            if all(c is not None for c in codes):
                break
            if failed and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                if not said:  # said once; the kill is repeated until they are gone
                    said = True
                    self.say(
                        f"stopping the processes still running {grace_s:.0f} s after a failure"
                    )
                self.signal_all(signal.SIGKILL)
            time.sleep(poll_s)
        for t in self._threads:
            t.join(timeout=5)
        codes = [p.returncode for p in self.procs]
        self.say("exit statuses: " + ", ".join(f"process {i}: {c}" for i, c in enumerate(codes)))
        if not self.procs and self.received:  # stopped before any process started
            return 128 + self.received[0]
        return next((c if c > 0 else 128 - c for c in (codes[i] for i in failed)), 0)

    def say(self, text: str) -> None:
        with self._print:
            self.out.write(f"[launch] {text}\n")
            self.out.flush()

    def on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.sigints += 1
        self.received.append(signal.SIGKILL if self.sigints >= 2 else signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(
            "error: put the command after --, e.g. python -m launch.local --processes=2 -- "
            "python -m experiments.train ...",
            file=sys.stderr,
        )
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        prog="python -m launch.local", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--processes", type=int, default=2, help="processes (hosts) in the job")
    parser.add_argument("--devices-per-process", type=int, default=4, help="CPU devices each")
    parser.add_argument("--logdir", default=None, help="per-process logs and HOMEs")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--grace_s", type=float, default=150.0, help="after a failure")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("no command after --")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error(
            f"--processes={args.processes} and --devices-per-process="
            f"{args.devices_per_process} must be >= 1"
        )
    logdir = os.path.abspath(
        args.logdir or os.path.join("runs", "launch", time.strftime("%Y%m%d-%H%M%S"))
    )
    job = Job(command, args.processes, args.devices_per_process, logdir, args.port)
    job.say(
        f"{args.processes} processes x {args.devices_per_process} CPU devices, coordinator "
        f"127.0.0.1:{job.port}; logs in {logdir}"
    )
    # Before the start: a Ctrl-C while starting would otherwise kill this launcher and
    # orphan the processes already started (in their own sessions, they would not see it).
    previous = {sig: signal.signal(sig, job.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        job.start()
        return job.wait(args.grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
