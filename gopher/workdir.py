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
import json
import os
import tempfile
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
