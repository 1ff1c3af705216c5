"""The run directory: writable, holding this experiment and no other.

WORKDIR/config.json records the experiment. A restart with the same workdir must be
the same experiment (model, data, optimiser recipe, seed, parallel layout may change);
fields that only change cadence or length (steps, logging, eval, checkpoint cadence)
may differ, so a run can be extended.
"""

from __future__ import annotations

import json
import os
import tempfile

# Fields a restart may change without making it a different experiment.
MUTABLE = {
    "train": {
        "steps",  # extending a run is allowed (the cosine then stretches from here on)
        "stop_at_step",
        "log_every",
        "eval_every",
        "eval_batches",
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
    "data": {"cache_dir"},
}


def check_writable(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"workdir {workdir!r} is not writable ({e.strerror}); pass a --workdir you can write to"
        ) from None


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if key in MUTABLE.get(section, set()):
                continue
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def record_config(workdir: str, config: dict) -> None:
    """Writes config.json, or checks that an existing one is the same experiment."""
    path = os.path.join(workdir, "config.json")
    # Round-trip through JSON so tuples and lists compare equal.
    config = json.loads(json.dumps(config, sort_keys=True))
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path} is unreadable ({e}); restore it or use a new --workdir"
            ) from None
        diff = _differences(old, config)
        if diff:
            raise ValueError(
                f"workdir {workdir!r} holds a different experiment ({'; '.join(diff[:3])}); "
                "use a new --workdir or the same config"
            )
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
