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


def configs_from_dict(cfg):
    """The frozen dataclasses the library takes, from an experiment ConfigDict."""
    model = dict(cfg.model)
    model_cfg = gopher_config.model_from_dict(model)
    train_cfg = gopher_config.train_from_dict(dict(cfg.train))
    data = dict(cfg.data)
    paths = data.get("paths", ())
    if isinstance(paths, str):
        data["paths"] = tuple(p for p in paths.split(",") if p)
    data_cfg = gopher_config.data_from_dict(data)
    parallel = gopher_config.parallel_from_dict(dict(cfg.get("parallel", {})))
    return model_cfg, train_cfg, data_cfg, parallel


def parse_flags(argv):
    """absl flags parser that reports a bad --config (e.g. an unknown preset) in one line."""
    from absl import flags

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
