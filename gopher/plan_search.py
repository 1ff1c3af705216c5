"""The planner's search: every (mesh, ZeRO, remat, microbatches) of a `Space`, pruned by
shard arithmetic before compiling, each survivor compiled by `gopher.plan.plan_schedule`
at every batch size of the run's schedule (a plan fits only if each batch does).

  devices = plan.topology_devices("v3:32x32")
  result = search(model_cfg, train_cfg, devices, plan.hardware(devices, "v3"), Space())
  result["fits"][0]   # the fitting plan with the best roofline throughput

Pruning needs no compile: a batch (any of the schedule's) that does not split over
replica x data per microbatch, a train state whose shards alone exceed HBM (the usable
figure, `plan.hardware`), or that state plus every layer's saved input at the largest
batch (`residual_bytes`, a floor on what the backward pass keeps).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from gopher import partition, sharding
from gopher import train as train_lib
from gopher.config import ModelConfig, ParallelConfig, TrainConfig
from gopher.plan import (
    CompileError,
    Hardware,
    check_batch,
    describe,
    microbatch_rows,
    physical_mesh,
    plan_schedule,
    size,
    summary_line,
)


@dataclasses.dataclass(frozen=True)
class Space:
    """What a search tries: model axis sizes (None: every divisor of the heads that
    divides a slice), ZeRO settings, remat policies and microbatch counts (None: every
    count whose microbatches split evenly over replica * data, ascending)."""

    models: tuple[int, ...] | None = None
    zeros: tuple[int, ...] = (1,)
    remats: tuple[str, ...] = ("full",)
    microbatches: tuple[int, ...] | None = None


def model_axis_sizes(model_cfg: ModelConfig, per_slice: int, batch: int) -> list[int]:
    """Model axis sizes dividing one slice's devices, ascending: those that divide the
    heads, and, when the batch is too small for the rest of the devices to be data
    parallel with those, the smallest size that leaves a data axis dividing the batch
    (the heads are then split mid-way; sharding notes it)."""
    h = model_cfg.num_heads
    sizes = [m for m in range(1, per_slice + 1) if per_slice % m == 0]
    fits_batch = [m for m in sizes if batch % (per_slice // m) == 0]
    heads = [m for m in sizes if h % m == 0 and m <= h]
    extra = [] if any(m in fits_batch for m in heads) or not fits_batch else fits_batch[:1]
    return sorted(set(heads + extra))


def residual_bytes(
    model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh, batch: int | None = None
) -> int:
    """A floor on the activations the backward pass keeps: every layer's input
    [b, T, D] of one microbatch of `batch` (default train_cfg.batch_size) (the layer scan
    saves them whatever the remat policy; the model axis does not split them), in the
    compute dtype."""
    rows = microbatch_rows(train_cfg, mesh, batch)
    itemsize = 4 if train_cfg.precision == "fp32" else 2
    return model_cfg.num_layers * rows * model_cfg.seq_len * model_cfg.d_model * itemsize


def state_bytes(model_cfg, train_cfg, parallel: ParallelConfig, mesh: Mesh) -> int:
    """Per-device bytes of the train state under `parallel` (shard arithmetic, no compile)."""
    fns = train_lib.make_train_functions(model_cfg, train_cfg, precision=train_cfg.precision)
    abstract = jax.eval_shape(fns.init, jax.random.key(0))
    specs = partition.state_partition_specs(abstract, mesh, parallel.zero).specs
    return sharding.abstract_bytes_per_device(abstract, specs, mesh)


def search(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    devices: Sequence[Any],
    hw: Hardware,
    space: Space,
    mfu: float = 0.4,
    max_compiles: int = 50,
    time_budget: float = 540.0,
    max_fits: int | None = None,
    log=lambda line: None,
) -> dict:
    """Plans every (mesh, zero, remat) of `space` at its fewest fitting microbatches.

    Pruned before compiling: batches that do not split over replica*data per microbatch,
    and states whose bytes alone (or with every layer's saved input at the largest batch
    size) exceed HBM. More microbatches do the same FLOPs in smaller pieces, so a count is
    tried only when the one before it did not fit. Each candidate is compiled at every
    batch size of the schedule (`plan.plan_schedule`: the largest first, the rest only
    when it fits). A compile XLA refuses for memory is a plan that does not fit; any other
    compile error is recorded in "errors" (its report in "tried", not fitting) and the
    search goes on. Stops before a candidate once `max_compiles` compiles or
    `time_budget` seconds are spent (a candidate started is finished), or after
    `max_fits` fitting plans. Returns {"fits": [plans, best roofline throughput first],
    "tried": [...], "pruned": [reasons], "errors": [...], "smallest_pruned": (bytes,
    reason) of the smallest memory-pruned need or None, "compiles", "seconds",
    "stopped"}; "stopped" is "space exhausted" when every candidate was tried or pruned.
    """
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    per_slice = len(devices) // slices
    sizes = train_cfg.batch_sizes()
    largest = max(sizes)
    start = time.perf_counter()
    out = {"tried": [], "pruned": [], "errors": [], "smallest_pruned": None, "compiles": 0}

    def pruned_by_memory(need: int, reason: str) -> None:
        out["pruned"].append(reason)
        if out["smallest_pruned"] is None or need < out["smallest_pruned"][0]:
            out["smallest_pruned"] = (need, reason)

    for m in space.models or model_axis_sizes(model_cfg, per_slice, train_cfg.batch_size):
        shape = (slices, per_slice // m, m)
        mesh = physical_mesh(devices, shape)
        for zero in space.zeros:
            parallel = ParallelConfig(replica=slices, data=shape[1], model=m, zero=zero)
            need = state_bytes(model_cfg, train_cfg, parallel, mesh)
            if need > hw.hbm_bytes:
                pruned_by_memory(need, f"mesh {shape} zero {zero}: state {size(need)} > HBM")
                continue
            for remat in space.remats:
                for k in space.microbatches or _counts(train_cfg.batch_size, mesh):
                    cfg = dataclasses.replace(train_cfg, remat=remat, microbatches=k)
                    try:
                        for b in sizes:
                            check_batch(b, k, mesh)
                    except ValueError as e:
                        out["pruned"].append(f"mesh {shape} K={k}: {e}")
                        continue
                    floor = need + residual_bytes(model_cfg, cfg, mesh, batch=largest)
                    if floor > hw.hbm_bytes:
                        at = f" at batch {largest}" if len(sizes) > 1 else ""
                        pruned_by_memory(
                            floor,
                            f"mesh {shape} zero {zero} K={k}: state + saved layer inputs"
                            f"{at} {size(floor)} > HBM",
                        )
                        continue
                    spent = time.perf_counter() - start
                    if out["compiles"] >= max_compiles or spent > time_budget:
                        stopped = f"after {out['compiles']} compile(s), {spent:.0f} s"
                        return _ranked(out, start, stopped)
                    try:
                        result = plan_schedule(model_cfg, cfg, parallel, mesh, hw, mfu)
                    except CompileError as e:
                        error = f"mesh {shape} zero {zero} remat {remat} K={k}: {e}"
                        out["errors"].append(error)
                        out["compiles"] += 1
                        log(error)
                        result = {
                            **describe(model_cfg, cfg, parallel, mesh, hw, mfu, largest),
                            "fits": False,
                            "compile_error": str(e),
                        }
                        out["tried"].append(result)
                        continue
                    out["tried"].append(result)
                    out["compiles"] += result["compiles"]
                    log(summary_line(result))
                    if result["fits"]:
                        break
                fits = sum(r["fits"] for r in out["tried"])
                if max_fits and fits >= max_fits:
                    return _ranked(out, start, f"after {fits} fitting plan(s)")
    return _ranked(out, start, "space exhausted")


def _counts(batch: int, mesh: Mesh) -> list[int]:
    """Microbatch counts K for which each of the K microbatches spans replica * data."""
    sizes = partition.axis_sizes(mesh)
    rows = batch // (sizes["replica"] * sizes["data"])
    return [k for k in range(1, rows + 1) if rows % k == 0] or [1]


def _ranked(out: dict, start: float, stopped: str) -> dict:
    """The search's result: fitting plans by roofline tokens/s (fewest FLOPs on CPU)."""

    def key(r):
        step = r.get("roofline_step_seconds")
        return (step is None, step or r.get("matmul_flops_per_device", 0.0))

    return {
        **out,
        "fits": sorted((r for r in out["tried"] if r["fits"]), key=key),
        "seconds": time.perf_counter() - start,
        "stopped": stopped,
    }
