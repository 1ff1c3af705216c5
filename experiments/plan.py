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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from experiments.configs import gopher as gopher_configs
from gopher.config import TABLE_PRESETS

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
    "hbm_gib", 0.0, "Memory per device to plan against, GiB (0: the device's own)."
)
_MFU = flags.DEFINE_float("mfu", 0.4, "MFU at which to state the step time.")
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
    "markdown", "", "If set, also write the fit table as markdown (one row per preset)."
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


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
    models = [_MODEL.value] if _MODEL.value else None
    if _DATA.value != -1:  # a fixed data axis fixes the model axis
        if per_slice % _DATA.value:
            raise ValueError(
                f"--data={_DATA.value} does not divide the {per_slice} devices of a slice; "
                f"use a divisor of {per_slice} (or --data=-1)"
            )
        models = [per_slice // _DATA.value]

    def whole(flag: str, values: list[str], allowed: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in values)
        except ValueError:
            raise ValueError(f"--{flag}={','.join(values)}: use {allowed}") from None

    if _SEARCH.value:
        zeros = whole("search_zero", _S_ZERO.value, "0, 1 or 3, comma-separated")
        remats = tuple(_S_REMAT.value)
    else:
        zeros, remats = whole("zero", _ZERO.value, "0, 1 or 3, comma-separated"), (_REMAT.value,)
    micro = (
        [_MICRO.value]
        if _MICRO.value
        else list(whole("search_microbatches", _S_MICRO.value, "whole numbers, comma-separated"))
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
        from gopher import topology

        generation = topology.prepare_environment(_TOPOLOGY.value, _SLICES.value)
        from gopher import plan as plan_lib  # imports jax: after the environment is set

        devices = plan_lib.topology_devices(_TOPOLOGY.value, _SLICES.value, _MEGACORE.value)
        hw = plan_lib.hardware(devices, generation)
        if _HBM.value:
            hw = dataclasses.replace(hw, hbm_bytes=_HBM.value * 2**30)
        log = (lambda line: print(line, file=sys.stderr)) if _JSON.value else print
        presets = TABLE_PRESETS if _ALL.value else [None]
        results = {}
        nothing: list[str] = []
        for preset in presets:
            result = plan_preset(plan_lib, preset, devices, hw, log)
            name = preset or _CONFIG.value.model.preset
            results[name] = result
            best = result["fits"][0] if result["fits"] else None
            if best is None and not result["tried"] and result["pruned"]:
                # Nothing was compiled: a flag ruled out every plan, not the memory.
                nothing.append(f"{name}: nothing compiled: {result['pruned'][0]}")
                log(nothing[-1])
                continue
            log(f"{name}: best {plan_lib.summary_line(best) if best else 'none fits'}")
    out = _json_object(results, devices, hw)
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(out, f, indent=1)
    if _MARKDOWN.value:
        os.makedirs(os.path.dirname(_MARKDOWN.value) or ".", exist_ok=True)
        with open(_MARKDOWN.value, "w") as f:
            f.write(markdown_table(out))
    if _JSON.value:
        print(json.dumps(out))
    if nothing and len(nothing) == len(presets):
        common.fail(nothing[0])
    return 0


_GIB = 2**30
_HEADER = (
    "| preset | mesh (replica x data x model) | ZeRO | remat | K | precision | batch | params "
    "| opt state | temp | total / HBM (GiB per device) | compile s | roofline step s "
    "| step s at {mfu:.0%} MFU |"
)


def _gib(n: float) -> str:
    """A memory size in GiB: whole sizes without decimals (16), others with two (2.94)."""
    g = n / _GIB
    return f"{g:.0f}" if g == round(g) else f"{g:.2f}"


def markdown_table(out: dict) -> str:
    """The plan JSON (one preset or --all) as a markdown table: the command, the hardware,
    one row per preset from its best plan (or the last one tried when none fits)."""
    hw = out["hardware"]
    presets = out.get("presets") or {out["model"]: out}
    mfu = next(iter(presets.values())).get("mfu", 0.4)
    peak = f"{hw['peak_flops'] / 1e12:.1f} TFLOP/s" if hw.get("peak_flops") else "unknown"
    lines = [
        f"`{out['command']}`",
        "",
        f"{out['topology']} x {out['slices']} slice(s): {hw['kind']}, memory "
        f"{_gib(hw['hbm_bytes'])} GiB and peak {peak} per device",
        "",
        _HEADER.format(mfu=mfu),
        "|" + "---|" * 14,
    ]
    for name, r in presets.items():
        mesh, per = r["mesh"], r["per_device_bytes"]
        step = r.get("roofline_step_seconds")
        at_mfu = r.get("step_seconds_at_mfu")
        cells = [
            name,
            f"{mesh['replica']} x {mesh['data']} x {mesh['model']}",
            r["zero"],
            r["remat"],
            r["microbatches"],
            r["precision"],
            r["batch"],
            f"{per['params'] / _GIB:.2f}",
            f"{per['opt_state'] / _GIB:.2f}",
            f"{per['temp'] / _GIB:.2f}",
            f"{per['total'] / _GIB:.2f} / {_gib(r['hbm_bytes'])} "
            + ("fits" if r["fits"] else "**does not fit**"),
            f"{r['compile_seconds']:.0f}",
            f"{step:.3f}" if step else "-",
            f"{at_mfu:.3f}" if at_mfu else "-",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _json_object(results: dict, devices, hw) -> dict:
    """One preset: its best plan's fields at the top level (or the last tried when none
    fits) plus "search"; --all: {"presets": {name: that}}; with the command and hardware."""

    def one(result):
        top = result["fits"][0] if result["fits"] else (result["tried"] or [{}])[-1]
        return {**top, "fits": bool(result["fits"]), "search": result}

    out = {
        "command": "python -m experiments.plan " + shlex.join(sys.argv[1:]),
        "topology": _TOPOLOGY.value,
        "slices": _SLICES.value,
        "hardware": dataclasses.asdict(hw),
    }
    if _ALL.value:
        return {**out, "presets": {name: one(r) for name, r in results.items()}}
    return {**out, **one(next(iter(results.values())))}


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=common.parse_flags))
