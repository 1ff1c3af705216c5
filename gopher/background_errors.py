"""Background failures in one line each, for the command-line tools.

Orbax and TensorStore report a failed save or restore in their own threads and in
finalizers of their coroutines, beside the error the main thread raises (and reports in
one line). `quiet()` installs hooks that print one warning per distinct background
message, and nothing for:
  - the copies of a restore failure that `gopher.checkpoint` reports itself: raised while
    `muted()` is active, or naming a step passed to `restore_failed(...)`;
  - "Event loop is closed": an asyncio loop closed under TensorStore's reads after a
    failed restore, noise beside the one-line error that follows, never a cause.
--verbose should skip `quiet()` and keep the tracebacks.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings

_muted = 0  # > 0 while a restore whose failure the caller reports itself is running
_failed_steps: set[str] = set()  # "DIR/STEP/" of every restore that failed here
_CLOSED_LOOP = "Event loop is closed"


@contextlib.contextmanager
def muted():
    """Background copies of this block's failure are dropped while it runs (TensorStore's
    threads, Orbax's read coroutines); `restore_failed` catches the later ones."""
    global _muted
    _muted += 1
    try:
        yield
    finally:
        _muted -= 1


def restore_failed(step_path: str) -> None:
    """Later background errors naming `step_path` ("DIR/STEP/") are copies of a failure
    already reported."""
    _failed_steps.add(step_path)


def is_noise(exc: BaseException) -> bool:
    """exc (or its cause) is a copy of a reported restore failure or a closed event loop."""
    if _muted:
        return True
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        text = str(exc)
        if isinstance(exc, RuntimeError) and text == _CLOSED_LOOP:
            return True
        if any(step in text for step in _failed_steps):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def quiet() -> None:
    """One line on stderr per distinct background failure instead of Orbax's and
    TensorStore's tracebacks, none for what `is_noise` drops."""
    seen = set()

    def report(kind, exc):
        if is_noise(exc):
            return
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        text = f"{type(exc).__name__}: {first}"
        if text not in seen:
            seen.add(text)
            print(f"warning: {kind}: {text}", file=sys.stderr, flush=True)

    threading.excepthook = lambda args: report("background thread", args.exc_value)
    sys.unraisablehook = lambda u: report("ignored in background", u.exc_value)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # A failed read leaves Orbax's coroutines unawaited; Python warns at exit.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
