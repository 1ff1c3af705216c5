"""What a checkpoint failure is: the errors callers stop on, and the kinds of raw error.

Three errors leave the checkpoint code, each with one line that names the fix, and each a
different way for the command to end (experiments/train.py):
  CheckpointError     a step that cannot be used (a ValueError: exit 2, as bad input)
  StorageUnavailable  the storage kept failing; rerun as it is (exit 7, retried by
                      `launch.tpu supervise`); nothing was moved
  RestoreFailed       checkpoints exist but none restores (exit 4): stop, never train
                      from scratch over them
Which of these a failed read becomes, and whether it is retried first, depends on what
the raw error from Orbax, TensorStore or the file system is: transient (the storage is
at fault: retry, never quarantine), Orbax's refusal of a stored shape (the config
differs, not the data), or else damage. All of it is kept apart from the Orbax code
(gopher/checkpoint.py, which re-exports the errors and is_transient) so that the
workdir's record of its checkpoint directories (gopher/checkpoint_layout.py), which
checkpoint.py imports, can raise and describe them too.
"""

from __future__ import annotations

import re

_TRANSIENT_TEXT = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection")
_SHAPE_ERROR = re.compile(
    r"Requested shape: (\([^)]*\)) is not compatible with the stored shape: (\([^)]*\))"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and the fix."""


class StorageUnavailable(RuntimeError):
    """Remote storage kept failing with a transient error: a step did not read after its
    retries, or did not write. The run stops and can be rerun as it is (exit 7); nothing
    was moved, and the previous checkpoint is intact."""


class RestoreFailed(RuntimeError):
    """Checkpoints exist but none restores; the run must stop, not start over.

    `other_shape`: every step holds a model of another shape (a config mismatch, not
    damage); `tried`: the steps and why each failed, for a caller's own message."""

    def __init__(self, message: str, other_shape: bool = False, tried: str = ""):
        super().__init__(message)
        self.other_shape, self.tried = other_shape, tried


def is_transient(e: BaseException) -> bool:
    """A read error worth retrying: the storage, not the checkpoint, is at fault."""
    if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return False  # a missing file stays missing
    text = str(e)
    return isinstance(e, OSError | ConnectionError | TimeoutError) or any(
        t in text for t in _TRANSIENT_TEXT
    )


def one_line(e: BaseException, limit: int = 120) -> str:
    """`e` as its type and the start of its text, on one line, for a message."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def shape_mismatch(e: BaseException) -> tuple[str, str] | None:
    """(requested, stored) shapes when `e` (or its cause) is Orbax's shape refusal."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        found = _SHAPE_ERROR.search(str(e))
        if found:
            return found.group(1), found.group(2)
        e = e.__cause__ or e.__context__
    return None
