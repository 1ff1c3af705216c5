"""Stopping a run cleanly: preemption (SIGTERM), Ctrl-C (SIGINT), and a hang watchdog.

SIGTERM is how a Cloud TPU VM (spot, preemptible, maintenance) or a scheduler asks a job
to stop. The run checkpoints at the next step and exits with PREEMPTED_EXIT_CODE; run the
same command again to resume. SIGINT (Ctrl-C) does the same with INTERRUPTED_EXIT_CODE; a
second Ctrl-C exits at once without a checkpoint.

With several processes every host must stop at the same step, or the ones that go on
wait forever in the next collective. jax's coordination service already catches SIGTERM
on every host (its preemption notifier owns that signal), and
`multihost_utils.reached_preemption_sync_point(step)` returns True on every host at the
same step once any host has seen it; installing a Python SIGTERM handler as well would
compete with jaxlib's. So with several processes a Ctrl-C is turned into a SIGTERM to
this process, and the loop asks the sync point; with one process both signals set flags.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time

import jax

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again": restart the same command to resume
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C


class Stopper:
    """Turns SIGTERM / SIGINT into a stop at a step boundary that every host agrees on."""

    def __init__(self):
        self.multi = jax.process_count() > 1
        self.sigterm = False
        self.sigint = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> Stopper:
        wanted = {signal.SIGINT: self._on_sigint}
        if not self.multi:
            wanted[signal.SIGTERM] = self._on_sigterm
        for sig, handler in wanted.items():
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True

    def _on_sigint(self, signum, frame) -> None:
        if self.sigint:
            print("second Ctrl-C: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_EXIT_CODE)
        self.sigint = True
        print(
            "Ctrl-C: checkpointing at the end of this step (Ctrl-C again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
        if self.multi:  # let jax's preemption sync stop every host at the same step
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> str | None:
        """ "SIGTERM" / "SIGINT" when the run should checkpoint at `step` and stop."""
        if self.multi:
            from jax.experimental import multihost_utils

            if not multihost_utils.reached_preemption_sync_point(step):
                return None
        elif not (self.sigterm or self.sigint):
            return None
        return "SIGINT" if self.sigint else "SIGTERM"

    @staticmethod
    def exit_code(reason: str) -> int:
        return INTERRUPTED_EXIT_CODE if reason == "SIGINT" else PREEMPTED_EXIT_CODE


class Watchdog:
    """Dumps every thread's Python stack when a step takes longer than `timeout_s`.

    A hung collective (a peer stuck in I/O, a deadlock) otherwise shows nothing at all.
    Each host runs its own, so a hang shows every host's stacks in its log. `kill -USR1`
    dumps the stacks on demand.
    """

    def __init__(self, timeout_s: float, say=print):
        self.timeout = timeout_s
        self.say = say
        self._last = (0, time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gopher-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        with contextlib.suppress(ValueError, RuntimeError, AttributeError):
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        if self.timeout > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def tick(self, step: int) -> None:
        """The run reached `step`."""
        self._last = (step, time.monotonic())

    def _run(self) -> None:
        dumped_at = None
        while not self._stop.wait(min(5.0, self.timeout / 4)):
            step, since = self._last
            waited = time.monotonic() - since
            if waited > self.timeout and dumped_at != since:
                dumped_at = since
                print(
                    f"watchdog: no step finished for {waited:.0f} s after step {step} (process "
                    f"{jax.process_index()}); stacks of every thread follow",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
