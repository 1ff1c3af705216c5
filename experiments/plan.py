"""Plan a run without the hardware: compile the train step for a TPU topology ahead of
time and report per-device memory against HBM, compile time, FLOPs and step time.

  python -m experiments.plan --config=experiments/configs/gopher.py:44m --topology=v3:32x32
  python -m experiments.plan --all --topology=v3:32x32 --json --out=benchmarks/plan.json \\
      --markdown=benchmarks/plan.md
  python -m experiments.plan --config=experiments/configs/gopher.py:280b \\
      --topology=v3:32x32 --slices=4 --search

A TPU topology (v2 v3 v4 v5e v5p v6e, e.g. v4:8x8x16) compiles with libtpu on this
host's CPU (`pip install -e .[tpu]`); `cpu:N` uses N fake CPU devices. The mesh is
replica x data x model with replica = --slices (over the data-centre network) unless
set; --model=0 (the default) takes the smallest model axis, then the fewest
microbatches, that fit. Defaults follow Gopher's setup rather than the preset's CPU
defaults: ZeRO-1 (optimiser-state partitioning), then ZeRO-3 where ZeRO-1's state
does not fit (Gopher pipelined its 280B over pods instead), and full
rematerialisation; batch and precision are the preset's. --search tries every model axis dividing the heads x
--search_zero x --search_remat x --microbatch counts and ranks the plans that fit by
a roofline (gopher/plan.py). --all does this for every table preset.

A plan fits when the step at every batch size of the run's schedule (280b: 1536, then
3072) fits in the memory the TPU runtime leaves usable per device (15.48 of a v3 core's
16 GiB; gopher/topology.py), or in --hbm_gib. The mesh, ZeRO, remat and microbatches are
the planner's flags: a --config.parallel.* or --config.train.remat / microbatches
override is refused (it would not be read), as are flags the chosen mode ignores.

Exit status: 0 every preset answered by a compile (a plan fits, or the whole space was
compiled or pruned and none fits: "fits" says which); 1 a preset does not fit before
any compile (every plan's state, or state plus saved layer inputs, exceeds the memory);
2 bad flags, or flags that rule out every plan; 3 no answer: the search stopped at
--max_compiles or --time_budget before a plan fit, or compiles failed for other reasons
than memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import common, plan_report
from experiments.configs import gopher as gopher_configs
from gopher.config import TABLE_PRESETS, ConfigError, TrainConfig

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/gopher.py:44m", "Experiment config file and preset."
)
_ALL = flags.DEFINE_bool("all", False, "Plan every table preset (44m ... 280b).")
_TOPOLOGY = flags.DEFINE_string("topology", "cpu:8", "GENERATION:SHAPE, e.g. v3:32x32, cpu:8.")
_SLICES = flags.DEFINE_integer("slices", 1, "Slices (pods) joined by the data-centre network.")
_MEGACORE = flags.DEFINE_bool("megacore", True, "v4: one device per chip (both cores).")
_REPLICA = flags.DEFINE_integer("replica", 0, "Replica axis size (0: --slices).")
_DATA = flags.DEFINE_integer("data", -1, "Data axis size (-1: the rest of the devices).")
_MODEL = flags.DEFINE_integer("model", 0, "Model axis size (0: the smallest that fits).")
_ZERO = flags.DEFINE_list(
    "zero", ["1", "3"], "ZeRO settings to try in order (0 off, 1 ZeRO-1, 3 FSDP); first fit."
)
_REMAT = flags.DEFINE_string("remat", "full", "Remat policy (TrainConfig.remat).")
_PRECISION = flags.DEFINE_string("precision", None, "Precision (default: the preset's).")
_MICRO = flags.DEFINE_integer("microbatches", 0, "Microbatches (0: the fewest that fit).")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch in sequences (0: the preset's).")
_HBM = flags.DEFINE_float(
    "hbm_gib",
    0.0,
    "Memory per device to plan against, GiB (0: what the TPU runtime leaves usable of the "
    "device's HBM, e.g. 15.48 of a v3 core's 16; on cpu: the host's RAM share).",
)
_MFU = flags.DEFINE_float("mfu", 0.4, "MFU at which to state the step time, in (0, 1].")
_SEARCH = flags.DEFINE_bool("search", False, "Search meshes x zero x remat x microbatches.")
_S_ZERO = flags.DEFINE_list("search_zero", ["0", "1", "3"], "ZeRO settings to search.")
_S_REMAT = flags.DEFINE_list(
    "search_remat", ["none", "dots_with_no_batch_dims_saveable", "full"], "Remat to search."
)
_S_MICRO = flags.DEFINE_list(
    "search_microbatches", [], "K to try (empty: every K whose microbatches span the batch axes)."
)
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 40, "Compiles per preset at most.")
_BUDGET = flags.DEFINE_float("time_budget", 480.0, "Seconds of compiling per preset at most.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object.")
_OUT = flags.DEFINE_string("out", "", "If set, also write the JSON object (with the command).")
_MARKDOWN = flags.DEFINE_string(
    "markdown",
    "",
    "If set, also write the fit table as markdown (one row per preset and batch size).",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


# --config fields the planner sets itself, and the flag that sets each (under --search).
_PLANNER_SETS = {
    "train.remat": ("--remat", "--search_remat"),
    "train.microbatches": ("--microbatches", "--search_microbatches"),
    "parallel.zero": ("--zero", "--search_zero"),
    "parallel.data": ("--data", "--data"),
    "parallel.model": ("--model", "--model"),
    "parallel.replica": ("--slices (the replica axis spans the slices)",) * 2,
}
# Library errors name the --config flags training reads; the planner's own flags instead.
_TRANSLATE = (
    (r"--config\.parallel\.replica=1 --config\.parallel\.data=", "--data="),
    (r"--config\.parallel\.data=-1 with a model size that divides it", "a --model dividing it"),
    (r"--config\.parallel\.data", "--data"),
    (r"--config\.parallel\.model", "--model"),
    (r"--config\.parallel\.zero", "--zero"),
    (r"--config\.parallel\.replica", "--slices"),
    (r"--config\.parallel\.\*", "--data and --model"),
    (r"--config\.train\.batch_size", "--batch"),
    (r"--config\.train\.remat", "--remat"),
    (r"--config\.train\.microbatches", "--microbatches"),
    (r"--config\.train\.precision", "--precision"),
)


class _FlagError(ValueError):
    """A bad flag, in the planner's own words (not translated)."""


def _planner_flags(message: str) -> str:
    for pattern, flag in _TRANSLATE:
        message = re.sub(pattern, flag, message)
    return message


def _given(name: str) -> bool:
    return bool(flags.FLAGS[name].present)


def _check_numbers() -> None:
    """One-line errors for values that would divide by zero, index nothing or silently
    mean nothing (before jax starts: --slices sets the CPU device count)."""
    checks = [
        ("data", _DATA.value == -1 or _DATA.value >= 1, "-1 (the rest) or a positive size"),
        ("model", _MODEL.value >= 0, "0 (the smallest that fits) or a positive size"),
        ("slices", _SLICES.value >= 1, "1 or more"),
        ("replica", _REPLICA.value >= 0, "0 (= --slices) or --slices"),
        ("mfu", 0 < _MFU.value <= 1, "a fraction in (0, 1], e.g. 0.4"),
        ("hbm_gib", _HBM.value >= 0, "0 (the device's usable HBM) or a positive size in GiB"),
        ("max_compiles", _MAX_COMPILES.value >= 1, "1 or more"),
        ("time_budget", _BUDGET.value > 0, "a positive number of seconds"),
        ("batch", _BATCH.value >= 0, "0 (the preset's) or a positive number of sequences"),
        ("microbatches", _MICRO.value >= 0, "0 (the fewest that fit) or a positive count"),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise _FlagError(f"--{name}={flags.FLAGS[name].value}: use {allowed}")


def _check_unread(generation: str) -> None:
    """One-line errors for settings the planner would override or ignore without a word:
    --config fields it sets itself, flags the chosen mode does not read, --nomegacore
    outside v4, and --slices with CPU devices (which have no slices)."""
    from ml_collections import config_flags

    search = _SEARCH.value
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    for key, value in overrides.items():
        if key in _PLANNER_SETS or key.startswith("parallel."):
            flag = _PLANNER_SETS.get(key, ("--data, --model, --zero or --slices",) * 2)[search]
            shown = f"={value}" if key in _PLANNER_SETS and "(" not in flag else ""
            raise _FlagError(
                f"--config.{key}={value} is not read: the planner sets it from its own "
                f"flags; use {flag}{shown} instead"
            )
    for key, flag, mine in (
        ("train.batch_size", "batch", _BATCH.value),
        ("train.precision", "precision", _PRECISION.value),
    ):
        if key in overrides and mine and mine != overrides[key]:
            raise _FlagError(
                f"--{flag}={mine} and --config.{key}={overrides[key]} disagree; give one"
            )
    if search:
        for flag, instead in (("remat", "search_remat"), ("zero", "search_zero")):
            if _given(flag):
                raise _FlagError(
                    f"--{flag} is not read with --search, which tries --{instead}; use "
                    f"--{instead}={flags.FLAGS[flag].serialize().split('=', 1)[-1]}"
                )
    else:
        for flag in ("search_zero", "search_remat", "search_microbatches"):
            if _given(flag):
                fix = {"search_zero": "--zero", "search_remat": "--remat"}.get(
                    flag, "--microbatches"
                )
                raise _FlagError(f"--{flag} is read only with --search; add --search or use {fix}")
    if not _MEGACORE.value and generation != "v4":
        raise _FlagError(
            f"--nomegacore applies to v4 only (its chips can be planned as two cores); "
            f"{generation} devices are planned as libtpu makes them, drop it"
        )
    if generation == "cpu" and _SLICES.value > 1:
        n = int(_TOPOLOGY.value.partition(":")[2])
        raise _FlagError(
            f"--slices={_SLICES.value} with --topology={_TOPOLOGY.value}: CPU devices have no "
            f"slices, so no replica axis would be planned; use a TPU topology, or "
            f"--topology=cpu:{n * _SLICES.value} for one slice"
        )
    for remat in [_REMAT.value] + (list(_S_REMAT.value) if search else []):
        try:
            TrainConfig(remat=remat)
        except ConfigError as e:
            flag = "search_remat" if search else "remat"
            raise _FlagError(f"--{flag}: {e}".replace("TrainConfig.remat = ", "")) from None


def _configs(preset: str | None):
    """(model_cfg, train_cfg) of --config, or of `preset`, with the flags' overrides."""
    cfg = _CONFIG.value if preset is None else gopher_configs.get_config(preset)
    model_cfg, train_cfg, _, _ = common.configs_from_dict(cfg)
    return model_cfg, dataclasses.replace(
        train_cfg,
        batch_size=_BATCH.value or train_cfg.batch_size,
        precision=_PRECISION.value or train_cfg.precision,
        remat=_REMAT.value,
    )


def _space(per_slice: int):
    """The search space the flags describe (--search) or the first-fit space (default)."""
    divisors = [m for m in range(1, per_slice + 1) if per_slice % m == 0]
    if _MODEL.value and per_slice % _MODEL.value:
        raise ValueError(
            f"--model={_MODEL.value} does not divide the {per_slice} devices of a slice; use "
            f"one of {', '.join(map(str, divisors))} (or --model=0: the smallest that fits)"
        )
    models = [_MODEL.value] if _MODEL.value else None
    if _DATA.value != -1:  # a fixed data axis fixes the model axis
        if per_slice % _DATA.value:
            raise ValueError(
                f"--data={_DATA.value} does not divide the {per_slice} devices of a slice; "
                f"use a divisor of {per_slice} (or --data=-1)"
            )
        if _MODEL.value and _MODEL.value * _DATA.value != per_slice:
            raise ValueError(
                f"--data={_DATA.value} --model={_MODEL.value} cover {_DATA.value * _MODEL.value}"
                f" of the {per_slice} devices of a slice; use --model={per_slice // _DATA.value}"
                f" or drop one of them"
            )
        models = [per_slice // _DATA.value]

    def whole(flag: str, values: list[str], allowed: str, ok=lambda v: True) -> tuple[int, ...]:
        try:
            out = tuple(int(v) for v in values)
        except ValueError:
            out = ()
        if len(out) != len(values) or not all(ok(v) for v in out):
            raise ValueError(f"--{flag}={','.join(values)}: use {allowed}")
        return out

    if _SEARCH.value:
        zeros = whole(
            "search_zero", _S_ZERO.value, "0, 1 or 3, comma-separated", lambda v: v in (0, 1, 3)
        )
        remats = tuple(_S_REMAT.value)
    else:
        zeros = whole("zero", _ZERO.value, "0, 1 or 3, comma-separated", lambda v: v in (0, 1, 3))
        remats = (_REMAT.value,)
    micro = (
        [_MICRO.value]
        if _MICRO.value
        else list(
            whole(
                "search_microbatches",
                _S_MICRO.value,
                "positive whole numbers, comma-separated",
                lambda v: v >= 1,
            )
        )
    )
    from gopher import plan_search  # imports jax: after the environment is set

    return plan_search.Space(
        tuple(models) if models else None, zeros, remats, tuple(micro) if micro else None
    )


def _replica() -> int:
    return _REPLICA.value or _SLICES.value


def plan_preset(plan_lib, preset, devices, hw, log) -> dict:
    """The search (or first fit) for one preset."""
    model_cfg, train_cfg = _configs(preset)
    if _replica() != _SLICES.value:
        raise ValueError(
            f"--replica={_replica()} but --slices={_SLICES.value}; the replica axis spans "
            f"the slices here, use --replica={_SLICES.value}"
        )
    from gopher import plan_search

    space = _space(len(devices) // _SLICES.value)
    return plan_search.search(
        model_cfg,
        train_cfg,
        devices,
        hw,
        space,
        mfu=_MFU.value,
        max_compiles=_MAX_COMPILES.value,
        time_budget=_BUDGET.value,
        max_fits=None if _SEARCH.value else 1,
        log=log,
    )


def main(argv):
    del argv
    with common.user_errors(_VERBOSE.value):
        try:
            return _main()
        except _FlagError:
            raise
        except ValueError as e:  # the library's words name --config flags: ours instead
            raise ValueError(_planner_flags(str(e))) from e


def _main() -> int:
    from gopher import topology

    _check_numbers()
    generation, _ = topology.parse_topology(_TOPOLOGY.value)
    _check_unread(generation)
    topology.prepare_environment(_TOPOLOGY.value, _SLICES.value)
    from gopher import plan as plan_lib  # imports jax: after the environment is set

    devices = plan_lib.topology_devices(_TOPOLOGY.value, _SLICES.value, _MEGACORE.value)
    hw = plan_lib.hardware(devices, generation)
    if _HBM.value:
        hw = dataclasses.replace(hw, hbm_bytes=_HBM.value * 2**30, hbm_source="--hbm_gib")
    log = (lambda line: print(line, file=sys.stderr)) if _JSON.value else print
    presets = TABLE_PRESETS if _ALL.value else [None]
    results, verdicts = {}, {}
    for preset in presets:
        result = plan_preset(plan_lib, preset, devices, hw, log)
        name = preset or _CONFIG.value.model.preset
        results[name] = result
        verdicts[name] = plan_report.verdict(
            name, result, hw, _SEARCH.value, _BUDGET.value, _MAX_COMPILES.value
        )
        if verdicts[name][1] in (0, 2) or _ALL.value:
            log(verdicts[name][0])
    out = _json_object(results, verdicts, devices, hw)
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(out, f, indent=1)
    if _MARKDOWN.value:
        os.makedirs(os.path.dirname(_MARKDOWN.value) or ".", exist_ok=True)
        with open(_MARKDOWN.value, "w") as f:
            f.write(plan_report.markdown_table(out))
    if _JSON.value:
        print(json.dumps(out))
    codes = [code for _, code in verdicts.values()]
    if all(code == 2 for code in codes):
        common.fail(next(iter(verdicts.values()))[0])
    for code in (3, 1):
        if code in codes:
            first = next(line for line, c in verdicts.values() if c == code)
            common.fail(first if len(presets) == 1 else f"{first} (and see above)", code)
    return 0


def _json_object(results: dict, verdicts: dict, devices, hw) -> dict:
    """One preset: its best plan's fields at the top level (or the last compiled when
    none fits) plus "search" and "verdict"; --all: {"presets": {name: that}}; with the
    command and hardware."""

    def one(name, result):
        compiled = [r for r in result["tried"] if "per_device_bytes" in r]
        top = result["fits"][0] if result["fits"] else (compiled or [{}])[-1]
        line, code = verdicts[name]
        return {
            **top,
            "preset": name,
            "fits": bool(result["fits"]),
            "verdict": line.split(": ", 1)[-1],
            "verdict_code": code,
            "search": result,
        }

    out = {
        "command": "python -m experiments.plan " + shlex.join(sys.argv[1:]),
        "topology": _TOPOLOGY.value,
        "slices": _SLICES.value,
        "hardware": dataclasses.asdict(hw),
    }
    if _ALL.value:
        return {**out, "presets": {name: one(name, r) for name, r in results.items()}}
    name, result = next(iter(results.items()))
    return {**out, **one(name, result)}


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
