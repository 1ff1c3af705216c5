"""Shared entry-point plumbing: ConfigDict -> dataclasses, one-line user errors."""

from __future__ import annotations

import contextlib
import os
import sys

from gopher import config as gopher_config


def fail(message: str, code: int = 2):
    """Prints one line and exits now: background threads (Orbax's) print nothing more."""
    print(f"error: {message}", file=sys.stderr)
    exit_now(code)


def exit_now(code: int):
    """Exits at once (Orbax's and jax's background threads cannot hold the process)."""
    distributed = sys.modules.get("gopher.distributed")
    if distributed is not None:
        # Leave the job together with the others (they meet the same error): process 0
        # going first would take the coordination service down under their feet.
        distributed.shutdown(quiet=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def user_errors(verbose: bool):
    """Turns bad-input errors (ValueError and OSError) into one line and exit status 2."""
    try:
        yield
    except (ValueError, OSError) as e:
        if verbose:
            raise
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


# Model-row recipe fields the config file copies into the train section, which is what
# training reads (experiments/configs/gopher.py); `model.X` keeps the row's value.
RECIPE_FIELDS = ("max_lr", "clip_norm", "batch_size", "batch_schedule", "precision")

# Data fields only some sources read: {field: the sources that read it}. The embedded
# corpus carries its own tokenizer and token shards, so it reads neither a tokenizer nor
# a token cache.
SOURCE_FIELDS = {
    "paths": ("files",),
    "mixture": ("embedded",),
    "corpus_dir": ("embedded",),
    "tokenizer_path": ("stdlib", "files"),
    "cache_dir": ("stdlib", "files"),
}


def _plain(value):
    """Lists as tuples, all the way down (flags and JSON give lists, presets tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _check_recipe_overrides(model: dict) -> None:
    """A changed model.X of the preset's recipe would be silently ignored: refuse it,
    naming --config.train.X, which training reads."""
    preset = model.get("preset")
    if not preset:
        return
    row = gopher_config.get_preset(preset)
    for name in RECIPE_FIELDS:
        if name in model and _plain(model[name]) != _plain(getattr(row, name)):
            value = model[name]
            shown = f"'{value}'" if isinstance(value, tuple) else value
            raise gopher_config.ConfigError(
                f"--config.model.{name}={value} is not read: training takes the recipe from "
                f"the train section; set --config.train.{name}={shown} instead"
            )


def _check_source_fields(data: dict) -> None:
    """A data field the chosen source does not read would be silently ignored: refuse it."""
    source = data.get("source", "stdlib")
    for name, readers in SOURCE_FIELDS.items():
        if data.get(name) and source not in readers:
            value = data[name]
            shown = ",".join(value) if isinstance(value, (list, tuple)) else value
            which = " or ".join(f"--config.data.source={r}" for r in readers)
            raise gopher_config.ConfigError(
                f"--config.data.{name}={shown} is read only with {which} (source is "
                f"{source!r}); use {'that source' if len(readers) == 1 else 'one of those'} "
                f"or drop --config.data.{name}"
            )


def configs_from_dict(cfg):
    """The frozen dataclasses the library takes, from an experiment ConfigDict.

    Refuses an override that nothing would read (one line naming the flag to use): a
    model-row recipe field (`RECIPE_FIELDS`; training reads train.X) or a data field of
    another source (`SOURCE_FIELDS`). A run's saved config.json is read by
    gopher.inference, not here, so runs recorded before these checks still load.
    """
    model = dict(cfg.model)
    _check_recipe_overrides(model)
    model_cfg = gopher_config.model_from_dict(model)
    train_cfg = gopher_config.train_from_dict(dict(cfg.train))
    data = dict(cfg.data)
    paths = data.get("paths", ())
    if isinstance(paths, str):
        data["paths"] = tuple(p for p in paths.split(",") if p)
    _check_source_fields(data)
    data_cfg = gopher_config.data_from_dict(data)
    parallel = gopher_config.parallel_from_dict(dict(cfg.get("parallel", {})))
    return model_cfg, train_cfg, data_cfg, parallel


def _missing_config_file(argv) -> str | None:
    """The last --config=PATH[:ARGS] of `argv` whose PATH is not a file, if any."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    if value is None:
        return None
    path = value.split(":", 1)[0]
    return None if os.path.isfile(path) else path


def parse_flags(argv):
    """absl flags parser that reports a bad --config (e.g. an unknown preset) in one line."""
    from absl import flags

    missing = _missing_config_file(argv) if "config" in flags.FLAGS else None
    if missing is not None and "--verbose" not in argv:
        # config_flags defers this error to the first read of the config, without the path.
        what = "is a directory" if os.path.isdir(missing) else "does not exist"
        fail(
            f"config file {missing!r} {what}; fix --config, e.g. "
            "--config=experiments/configs/gopher.py:tiny"
        )
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # flag parsing raises several types; all are bad input here
        if "--verbose" in argv:
            raise
        chain, cause = [], e
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        ours = [c for c in chain if isinstance(c, gopher_config.ConfigError)]
        if ours:
            e = ours[0]
        elif any(isinstance(c, (KeyError, AttributeError)) for c in chain):
            keys = [
                str(c.args[0]).strip("'\"") for c in chain if isinstance(c, KeyError) and c.args
            ]
            bad = [a for a in argv[1:] if a.startswith("--config.")]
            named = [a for a in bad if any(f".{k}=" in a or a.endswith(f".{k}") for k in keys)]
            fail(
                f"unknown config field in {' '.join(named or bad) or argv[1:]}; "
                "see the config file for the valid names"
            )
        lines = [x for x in str(e).strip().splitlines() if x.strip()]
        last = lines[-1] if lines else type(e).__name__
        # config_flags folds a get_config traceback into the text: keep its final line.
        fail(last.split("ConfigError: ", 1)[-1])
