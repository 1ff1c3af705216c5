"""What the planner reports (experiments/plan.py): each preset's verdict in one line with
its exit status, and the plan JSON as a markdown table (the command, the hardware, one row
per preset and batch size of its schedule), as in benchmarks/plan_*.md.
"""

from __future__ import annotations


def verdict(
    name: str, result: dict, hw, search: bool, time_budget: float, max_compiles: int
) -> tuple[str, int]:
    """What the search found for one preset, in one line, and its exit status (see
    experiments/plan.py's docstring): 0 fits or none fits, 1 does not fit before compiling,
    2 every plan ruled out by the flags, 3 no answer (stopped at the cap, or compile
    errors). `search`, `time_budget` and `max_compiles` are the planner's flags, named in
    the advice."""
    from gopher.plan import size, summary_line

    if result["fits"]:
        return f"{name}: best {summary_line(result['fits'][0])}", 0
    errors, stopped = result.get("errors", []), result["stopped"]
    compiled = [r for r in result["tried"] if "per_device_bytes" in r]
    space = "--model, --microbatches" + (", --search_zero, --search_remat" if search else "")
    if stopped != "space exhausted":
        return (
            f"{name}: no fitting plan found before the search stopped ({stopped}; "
            f"the {len(compiled)} compiled did not fit): not an answer; raise "
            f"--time_budget (now {time_budget:g} s) or --max_compiles (now "
            f"{max_compiles}), or narrow the space with {space}",
            3,
        )
    if errors:
        return (
            f"{name}: no answer: {len(errors)} compile(s) failed for reasons other than "
            f"memory ({errors[0]}), and no other plan fits",
            3,
        )
    if not compiled and result["smallest_pruned"]:
        need, reason = result["smallest_pruned"]
        return (
            f"{name}: does not fit: every plan needs more than the {size(hw.hbm_bytes)} per "
            f"device ({hw.hbm_source}) before compiling; the smallest is {size(need)} "
            f"({reason})",
            1,
        )
    if not compiled:
        # Nothing was compiled and nothing was over the memory: a flag ruled out every plan.
        return f"{name}: nothing compiled: {result['pruned'][0]}", 2
    return (
        f"{name}: none fits: the whole space was tried ({len(compiled)} plan(s) compiled "
        f"over {size(hw.hbm_bytes)} per device, {len(result['pruned'])} pruned)",
        0,
    )


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
    one row per preset and batch size from its best plan (or the last one compiled when
    none fits), or a row saying why there is no plan."""
    hw = out["hardware"]
    presets = out.get("presets") or {out["preset"]: out}
    mfu = next(iter(presets.values())).get("mfu", 0.4)
    peak = f"{hw['peak_flops'] / 1e12:.1f} TFLOP/s" if hw.get("peak_flops") else "unknown"
    nominal = hw.get("hbm_nominal_bytes") or hw["hbm_bytes"]
    if hw.get("hbm_source") == "--hbm_gib":
        memory = (
            f"{_gib(nominal)} GiB nominal, planned against {_gib(hw['hbm_bytes'])} GiB (--hbm_gib)"
        )
    elif nominal != hw["hbm_bytes"]:
        memory = (
            f"{_gib(nominal)} GiB nominal, {_gib(hw['hbm_bytes'])} GiB usable (what the TPU "
            "runtime leaves; fits are judged against it)"
        )
    else:
        memory = f"{_gib(hw['hbm_bytes'])} GiB ({hw.get('hbm_source') or 'per device'})"
    lines = [
        f"`{out['command']}`",
        "",
        f"{out['topology']} x {out['slices']} slice(s): {hw['kind']}, memory {memory} "
        f"and peak {peak} per device",
        "",
        _HEADER.format(mfu=mfu),
        "|" + "---|" * 14,
    ]
    for name, r in presets.items():
        if "per_device_bytes" not in r:  # nothing compiled: the reason instead
            lines.append(_cells([name] + ["-"] * 9 + [r.get("verdict", "no plan")] + ["-"] * 3))
            continue
        done = {b["batch"]: b for b in r.get("batches") or [r]}
        for size in r.get("batch_sizes") or [r["batch"]]:
            b = done.get(size)
            if b is None:
                why = "not compiled: a larger batch does not fit"
                lines.append(_cells([name] + ["-"] * 5 + [size] + ["-"] * 3 + [why] + ["-"] * 3))
                continue
            verdict = "fits" if b["fits"] else "**does not fit**"
            if not r["fits"] and r.get("verdict_code") == 3:
                verdict += " (no answer: the search stopped first, see its output)"
            lines.append(_row(name, b, r, verdict))
    return "\n".join(lines) + "\n"


def _cells(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _row(name: str, b: dict, r: dict, verdict: str) -> str:
    """One table row: the plan `r`'s configuration at batch report `b`."""
    mesh, per = r["mesh"], b["per_device_bytes"]
    step = b.get("roofline_step_seconds")
    at_mfu = b.get("step_seconds_at_mfu")
    cells = [
        name,
        f"{mesh['replica']} x {mesh['data']} x {mesh['model']}",
        r["zero"],
        r["remat"],
        r["microbatches"],
        r["precision"],
        b["batch"],
        f"{per['params'] / _GIB:.2f}",
        f"{per['opt_state'] / _GIB:.2f}",
        f"{per['temp'] / _GIB:.2f}",
        f"{per['total'] / _GIB:.2f} / {_gib(r['hbm_bytes'])} {verdict}",
        f"{b['compile_seconds']:.0f}",
        f"{step:.3f}" if step else "-",
        f"{at_mfu:.3f}" if at_mfu else "-",
    ]
    return _cells(cells)
