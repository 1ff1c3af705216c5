"""Ahead-of-time planning: compile the real train step for a device topology and read
what XLA says it needs, without the hardware.

  devices = topology_devices("v3:32x32")          # libtpu's deviceless TPU devices
  mesh = physical_mesh(devices, (1, 128, 16))     # (both in gopher/plan_target.py)
  report = plan(model_cfg, train_cfg, ParallelConfig(data=128, model=16, zero=1), mesh)

`plan` jits the train step with `sharding.shard_train` (state donated), lowers it on
ShapeDtypeStructs of the state carrying their shardings and a [B, T+1] int32 token
batch split over the batch axes, compiles it, and reports per device:
  params, opt_state  bytes of the state's shards (opt_state includes the fp32 master),
                     from the shardings' shard shapes;
  temp, total        from the executable's memory_analysis(): total = arguments +
                     outputs - aliases + temporaries + generated code (what the
                     donated step holds); it fits when total <= the memory the TPU
                     runtime leaves usable (topology.USABLE_SOURCES: 15.48 of a v3
                     core's 16 GiB; --hbm_gib overrides it), the host's RAM share on CPU;
and the model FLOPs per step (metrics.flops_per_token x B x T), the step time at a given
MFU, and a roofline step time: max(matmul FLOPs / peak, bytes accessed / HBM bandwidth)
plus collective bytes over the links (ICI within a slice, DCN between slices),
communication assumed not overlapped with compute. FLOPs and collective bytes are read
from the compiled HLO with loop trips counted (gopher/hlo.py), the bytes accessed from
cost_analysis() (see `roofline`).
A program that does not fit may fail to compile on TPU with RESOURCE_EXHAUSTED, in
either of XLA:TPU's two texts ("... HLO temporaries (X) exceeds available HBM (Y)" or
"Ran out of memory in memory space hbm. Used X of Y hbm"): it is then "does not fit",
with the figures read from the error; any other compile error raises `CompileError`.
A deviceless compile need not refuse such a program (libtpu 0.0.42 compiled a 19.8 GiB
step for a 16 GiB v3 core): the verdict is the total's. `plan_schedule` plans every
batch size a run's schedule uses (train_cfg.batch_sizes(): 280b goes 1536 -> 3072), as
training's own check does before its first step. The search over meshes, ZeRO settings,
remat policies and microbatch counts that calls it is gopher/plan_search.py.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from gopher import hlo, metrics, partition, sharding
from gopher.config import ModelConfig, ParallelConfig, TrainConfig
from gopher.plan_target import Hardware, hardware, physical_mesh, topology_devices
from gopher.topology import GiB

# The target's devices, mesh and hardware figures live in gopher/plan_target.py; callers
# reach them through this module too (plan.topology_devices, plan.hardware, ...).
__all__ = [
    "CompileError",
    "Hardware",
    "hardware",
    "physical_mesh",
    "plan",
    "plan_schedule",
    "topology_devices",
]


def leaf_bytes(tree: Any) -> int:
    """Bytes of one device's shards of ShapeDtypeStructs carrying NamedShardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def check_batch(batch: int, microbatches: int, mesh: Mesh) -> None:
    """One-line error unless each of the `microbatches` spans the batch axes evenly."""
    sizes = partition.axis_sizes(mesh)
    n = sizes["replica"] * sizes["data"]
    if batch % (microbatches * n):
        raise ValueError(
            f"batch {batch} in {microbatches} microbatch(es) does not split over replica*data"
            f" = {n}; use a --batch that {microbatches * n} divides, e.g. "
            f"--batch={-(-batch // (microbatches * n)) * microbatches * n}"
        )


class CompileError(ValueError):
    """A compile that failed for a reason other than memory (the search records it and
    goes on to the next candidate)."""


# XLA:TPU's out-of-memory texts (sizes in units of 2**30 etc., as tsl prints them):
# runtime-style "... the total memory required for HLO temporaries (X) exceeds available
# HBM (Y)", and compile-time "Ran out of memory in memory space hbm. Used X of Y hbm." with
# a breakdown ("program X", "HLO temp X") that may follow.
_SIZE = r"([\d.]+)([KMGT]?)(?:i?B)?"
_OOM = re.compile(rf"HLO temporaries \({_SIZE}\)")
_OOM_AVAILABLE = re.compile(rf"exceeds available HBM \({_SIZE}\)")
_OOM_USED = re.compile(rf"Used {_SIZE} of {_SIZE} hbm")
_OOM_HLO_TEMP = re.compile(rf"HLO temp\s+{_SIZE}")
_OOM_PROGRAM = re.compile(rf"\bprogram\s+{_SIZE}")


def _bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def plan(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    parallel: ParallelConfig,
    mesh: Mesh,
    hw: Hardware,
    mfu: float = 0.4,
    batch: int | None = None,
) -> dict:
    """Compiles one train step on `mesh` for a [batch, T+1] token batch (default
    train_cfg.batch_size) and reports its memory, FLOPs and step time (see the module
    docstring); `train_cfg` holds precision, remat, microbatches (and the schedule, which
    the step's learning rate reads). A step XLA refuses for memory is reported as not
    fitting; any other compile error raises CompileError."""
    batch = batch or train_cfg.batch_size
    check_batch(batch, train_cfg.microbatches, mesh)
    fns, sharded = sharding.build_train(model_cfg, train_cfg, parallel, mesh)
    state = sharding.abstract_state_with_shardings(fns, sharded)
    tokens = jax.ShapeDtypeStruct(
        (batch, model_cfg.seq_len + 1), np.int32, sharding=sharded.batch_sharding
    )
    report = describe(model_cfg, train_cfg, parallel, mesh, hw, mfu, batch)
    report["per_device_bytes"] = {
        "params": leaf_bytes(state.params),
        "opt_state": leaf_bytes((state.opt_state, state.master)),
        "state": leaf_bytes(state),
    }
    start = time.perf_counter()
    try:
        lowered = sharded.train_step.lower(state, tokens)
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        report["compile_seconds"] = time.perf_counter() - start
        return _out_of_memory(report, str(e))
    report["compile_seconds"] = time.perf_counter() - start
    mem = compiled.memory_analysis()
    xla = {
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes),
    }
    total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] + xla["code"]
    report["memory_analysis"] = xla
    report["per_device_bytes"].update(temp=xla["temp"], total=total)
    report["fits"] = total <= hw.hbm_bytes
    module = hlo.Module(compiled.as_text())
    # The step's matmul FLOPs split evenly, and (CPU, GPU) what each device really runs:
    # their ratio is 1 when the mesh splits the work without repeating it.
    even = hlo.lowered_dot_flops(lowered.as_text()) / mesh.devices.size
    compiled_flops = module.dot_flops()
    report["matmul_flops_per_device"] = compiled_flops if compiled_flops is not None else even
    report["matmul_split_ratio"] = None if compiled_flops is None else compiled_flops / even
    # Tensor parallelism that splits the work gathers at most one [b, T, D] block per
    # device inside the layer loop (ZeRO-3 adds its parameter gathers there).
    gathers = [c.bytes for c in module.collectives() if c.op == "all-gather" and c.loops]
    report["largest_loop_all_gather_bytes"] = max(gathers, default=0)
    rows = microbatch_rows(train_cfg, mesh, batch)
    report["block_bytes"] = rows * model_cfg.seq_len * model_cfg.d_model * 4  # fp32 [b, T, D]
    report.update(roofline(compiled, module, mesh, hw, report))
    report["notes"] = list(sharded.notes)
    return report


def plan_schedule(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    parallel: ParallelConfig,
    mesh: Mesh,
    hw: Hardware,
    mfu: float = 0.4,
) -> dict:
    """`plan` at every batch size the run uses (train_cfg.batch_sizes(), the schedule's
    too), with the same mesh, ZeRO, remat and microbatches: training keeps K across a
    batch switch, so each microbatch grows with the batch. The largest batch is compiled
    first; when it does not fit the plan does not, and the others are not compiled.
    Otherwise every other batch is compiled too, and the plan fits only if each does.
    The report's own fields are the binding batch's (the largest total; its "batch"
    says which); "batches" holds each compiled batch's report in schedule order,
    "batch_sizes" the schedule's sizes and "compiles" how many compiles it took."""
    sizes = train_cfg.batch_sizes()
    for b in sizes:
        check_batch(b, train_cfg.microbatches, mesh)
    reports: dict[int, dict] = {}
    for b in sorted(sizes, reverse=True):
        reports[b] = plan(model_cfg, train_cfg, parallel, mesh, hw, mfu, batch=b)
        if not reports[b]["fits"]:
            break
    done = [reports[b] for b in sizes if b in reports]
    binding = max(done, key=lambda r: (not r["fits"], r["per_device_bytes"]["total"]))
    return {
        **binding,
        "fits": all(r["fits"] for r in done) and len(done) == len(sizes),
        "batch_sizes": list(sizes),
        "batches": done,
        "compiles": len(done),
        "compile_seconds": sum(r["compile_seconds"] for r in done),
    }


def describe(model_cfg, train_cfg, parallel, mesh, hw, mfu, batch: int | None = None) -> dict:
    """The configuration, the hardware and the step time at `mfu` (no compile)."""
    sizes = partition.axis_sizes(mesh)
    batch = batch or train_cfg.batch_size
    tokens = batch * model_cfg.seq_len
    flops = metrics.flops_per_token(model_cfg) * tokens
    n = mesh.devices.size
    step_at_mfu = flops / (mfu * hw.peak_flops * n) if hw.peak_flops else None
    return {
        "model": model_cfg.name,
        "mesh": {"replica": sizes["replica"], "data": sizes["data"], "model": sizes["model"]},
        "devices": n,
        "device_kind": hw.kind,
        "zero": parallel.zero,
        "remat": train_cfg.remat,
        "precision": train_cfg.precision,
        "microbatches": train_cfg.microbatches,
        "batch": batch,
        "seq_len": model_cfg.seq_len,
        "hbm_bytes": int(hw.hbm_bytes),
        "hbm_nominal_bytes": int(hw.hbm_nominal_bytes or hw.hbm_bytes),
        "peak_flops_per_device": hw.peak_flops,
        "model_flops_per_step": flops,
        "mfu": mfu,
        "step_seconds_at_mfu": step_at_mfu,
    }


def _out_of_memory(report: dict, message: str) -> dict:
    """A report for a step XLA refused to compile for memory, the figures read from
    either of its texts (see _OOM); CompileError for any other compile error.

    Runtime-style: temp = the HLO temporaries; the arguments are the state plus the
    tokens and, the state donated, the outputs add nothing beyond it, so total = state +
    temp. Compile-time: temp = the "HLO temp" (else "program", else "Used") figure, and
    total = the larger of "Used" (which counts the arguments when XLA lists them) and
    state + temp. Y, what XLA says is available, goes to "hbm_bytes_reported"."""
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    per = report["per_device_bytes"]
    used = _OOM_USED.search(message)
    runtime = _OOM.search(message)
    if used:
        detail = _OOM_HLO_TEMP.search(message) or _OOM_PROGRAM.search(message)
        need = _bytes(*used.group(1, 2))
        temp = _bytes(*detail.group(1, 2)) if detail else need
        total = max(need, per["state"] + temp)
        available = _bytes(*used.group(3, 4))
    elif runtime and "RESOURCE_EXHAUSTED" in message:
        temp = _bytes(*runtime.group(1, 2))
        total = per["state"] + temp
        avail = _OOM_AVAILABLE.search(message)
        available = _bytes(*avail.group(1, 2)) if avail else None
    else:
        raise CompileError(f"compile failed: {first[:300]}")
    per.update(temp=temp, total=total)
    report.update(fits=False, compile_error=first[:300], hbm_bytes_reported=available)
    return report


def roofline(compiled: Any, module: hlo.Module, mesh: Mesh, hw: Hardware, report: dict) -> dict:
    """Step time: max(matmul FLOPs / peak, bytes accessed / HBM bandwidth) + collective
    bytes / link bandwidth, per device. FLOPs and collective bytes are read from the
    compiled program's HLO (`module`), loop bodies counted per trip, the FLOPs being
    what one device runs (work XLA repeats on several devices included);
    cost_analysis() counts each loop body once (the layers, the microbatches), so its
    bytes make the HBM term a lower bound."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    accessed = float(cost.get("bytes accessed", 0.0))
    slice_of = [getattr(d, "slice_index", 0) for d in mesh.devices.flat]
    comm = module.link_bytes(slice_of)
    out = {
        "cost_analysis_flops_per_device": float(cost.get("flops", 0.0)),
        "cost_analysis_bytes_accessed_per_device": accessed,
        "collective_bytes_per_device": comm,
    }
    if hw.peak_flops is None:
        return out
    compute = max(report["matmul_flops_per_device"] / hw.peak_flops, accessed / hw.hbm_bw)
    links = comm["ici"] / hw.ici_bw + comm["dcn"] / hw.dcn_bw
    step = compute + links
    out.update(
        roofline_compute_seconds=compute,
        roofline_collective_seconds=links,
        roofline_step_seconds=step,
        roofline_mfu=report["model_flops_per_step"] / (step * hw.peak_flops * mesh.devices.size),
        roofline_tokens_per_second=report["batch"] * report["seq_len"] / step,
    )
    return out


def microbatch_rows(train_cfg: TrainConfig, mesh: Mesh, batch: int | None = None) -> int:
    """Sequences one device runs per microbatch (the batch, default train_cfg's first,
    over replica x data x K)."""
    sizes = partition.axis_sizes(mesh)
    batch = batch or train_cfg.batch_size
    return batch // (sizes["replica"] * sizes["data"] * train_cfg.microbatches)


def size(n: float) -> str:
    """Bytes for a message: GiB with 2 decimals, MiB below a tenth of a GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def summary_line(r: dict) -> str:
    """One line per plan: configuration, per-device GiB against usable HBM (the nominal
    beside it where they differ), each batch size's total under a schedule, times."""
    mesh = r["mesh"]
    per = r["per_device_bytes"]
    step = r.get("roofline_step_seconds")
    nominal = r.get("hbm_nominal_bytes", r["hbm_bytes"])
    hbm = f"{r['hbm_bytes'] / GiB:.2f} GiB"
    if nominal != r["hbm_bytes"]:
        hbm += f" (of {nominal / GiB:.2f} nominal)"
    batches = r.get("batches") or []
    by_batch = ""
    if len(r.get("batch_sizes", [])) > 1:
        done = {b["batch"]: b["per_device_bytes"]["total"] / GiB for b in batches}
        by_batch = (
            " [by batch "
            + ", ".join(
                f"{b}: {done[b]:.2f}" if b in done else f"{b}: not compiled"
                for b in r["batch_sizes"]
            )
            + "]"
        )
    return (
        f"{r['model']:>5} mesh r{mesh['replica']} d{mesh['data']} m{mesh['model']} "
        f"zero {r['zero']} remat {r['remat']} K={r['microbatches']} {r['precision']} "
        f"batch {r['batch']}: "
        f"params {per['params'] / GiB:.2f} opt {per['opt_state'] / GiB:.2f} "
        f"temp {per['temp'] / GiB:.2f} total {per['total'] / GiB:.2f} / "
        f"{hbm} {'fits' if r['fits'] else 'DOES NOT FIT'}{by_batch}; "
        f"compile {r['compile_seconds']:.1f} s"
        + (f"; roofline step {step:.3f} s (MFU {r['roofline_mfu']:.2f})" if step else "")
        + (
            f"; step at MFU {r['mfu']:.2f}: {r['step_seconds_at_mfu']:.3f} s"
            if r["step_seconds_at_mfu"]
            else ""
        )
    )
