"""One interface over the two parallel paths, for the host loop and checkpoints.

An Engine owns the jitted (or pmapped) step and knows how to move its state to and
from the checkpoint layout, which is always the single-device `TrainState` pytree
(arrays carrying the jit path's shardings), so a checkpoint written by either path
restores on the other and on any mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gopher import host_memory, partition, sharding
from gopher.config import ModelConfig, ParallelConfig, TrainConfig


@dataclasses.dataclass
class Engine:
    init: Callable[[jax.Array], Any]
    # (state, this process's rows [b, T+1], global_batch=None: B, default train_cfg's)
    train_step: Callable[..., tuple[Any, dict]]
    # (state, this process's rows [b, T+1], their target mask [b, T] bool) -> (NLL sum in
    # nats, target tokens) over the unmasked targets of the whole global eval batch of
    # train_cfg.eval_batch_size rows, i.e. summed over every host's rows.
    eval_sums: Callable[[Any, np.ndarray, np.ndarray], tuple[float, int]]
    abstract_state: Callable[[], Any]  # checkpoint-layout ShapeDtypeStructs with shardings
    to_checkpoint: Callable[[Any], Any]
    from_checkpoint: Callable[[Any], Any]
    description: str
    # jit path: compile the step ahead of time for a global batch shape; returns bytes per
    # device {"temp", "argument", "output", "alias"} from XLA's memory analysis, or None.
    precompile: Callable[[tuple[int, int]], dict | None] = lambda shape: None
    # jit path: the same for the eval step at a global eval batch shape; the bytes also
    # count "resident", the state the eval step does not take (the optimiser's) but that
    # stays on the device meanwhile.
    precompile_eval: Callable[[tuple[int, int]], dict | None] = lambda shape: None
    # The rows [lo, hi) of a global batch of B rows that this process feeds.
    local_rows: Callable[[int], tuple[int, int]] = lambda b: _even_rows(b)
    # A global batch (train or eval) must be a multiple of this: the devices it is split over.
    batch_multiple: int = 1
    # Sharding fallbacks worth a line in the log (e.g. heads split mid-way).
    notes: tuple[str, ...] = ()


def _even_rows(global_batch: int) -> tuple[int, int]:
    """The data axis split evenly over processes, in process order."""
    local = global_batch // jax.process_count()
    return jax.process_index() * local, (jax.process_index() + 1) * local


def _sums_from_local_nll(eval_nll: Callable) -> Callable:
    """eval_sums for an engine whose eval_nll gives this process's rows (pmap)."""

    def eval_sums(state, batch, mask):
        nll = eval_nll(state, batch).astype(np.float64)
        mask = np.asarray(mask, bool)
        local = np.array([nll[mask].sum(), mask.sum()], np.float64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            local = np.asarray(multihost_utils.process_allgather(local)).sum(0)
        return float(local[0]), int(local[1])

    return eval_sums


def available_bytes_per_device(free: bool = False) -> int | None:
    """Memory one device may use: the accelerator's limit (`free`: less what it holds
    now), or the host's free RAM shared by the simulated CPU devices."""
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - (int(stats.get("bytes_in_use", 0)) if free else 0)
    if dev.platform == "cpu":
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        return free // max(1, jax.local_device_count())
    return None


def _memory(exe) -> dict | None:
    """Bytes per device of a compiled program, from XLA's memory analysis (or None)."""
    try:
        m = exe.memory_analysis()
    except Exception:  # not every backend reports it
        return None
    if m is None:
        return None
    return {
        "temp": int(m.temp_size_in_bytes),
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
    }


def _bytes_per_device(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs that carry shardings."""
    return sum(
        math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
        for a in jax.tree.leaves(abstract_tree)
    )


def build(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    parallel: ParallelConfig,
) -> Engine:
    if parallel.mode == "pmap":
        return _pmap_engine(model_cfg, train_cfg, parallel)
    return _jit_engine(model_cfg, train_cfg, parallel)


def _jit_engine(model_cfg, train_cfg, parallel) -> Engine:
    mesh = sharding.make_mesh(parallel)
    fns, sharded = sharding.build_train(
        model_cfg, train_cfg, parallel, mesh, fault_steps=train_cfg.inject_nan_steps
    )
    sizes = partition.axis_sizes(mesh)

    compiled = {}
    # Sums over the global [B, T] NLL inside one program: the result is replicated, so
    # every host reads the total without gathering rows it does not hold. Masked targets
    # (the padded tail of a held-out stream) count neither NLL nor tokens.
    nll_sums = jax.jit(
        lambda nll, mask: (
            jnp.sum(jnp.where(mask, nll.astype(jnp.float32), 0.0)),
            jnp.sum(mask.astype(jnp.int32)),
        )
    )

    def step(state, batch, global_batch=None):  # B changes with a batch schedule
        tokens = sharding.make_global_batch(batch, mesh, global_batch or train_cfg.batch_size)
        fn = compiled.get(tokens.shape, sharded.train_step)
        return fn(state, tokens)

    compiled_eval = {}

    def eval_sums(state, batch, mask):
        tokens = sharding.make_global_batch(batch, mesh, train_cfg.eval_batch_size)
        mask = sharding.make_global_batch(np.asarray(mask, bool), mesh, train_cfg.eval_batch_size)
        fn = compiled_eval.get(tokens.shape, sharded.eval_step)
        total, count = nll_sums(fn(state.params, tokens)["nll"], mask)
        return float(total), int(count)

    def precompile(shape):
        sharding.check_batch_size(shape[0], mesh)
        abstract = sharding.abstract_state_with_shardings(fns, sharded)
        tokens = jax.ShapeDtypeStruct(shape, np.int32, sharding=sharded.batch_sharding)
        exe = sharded.train_step.lower(abstract, tokens).compile()
        compiled[tuple(shape)] = exe
        host_memory.after_compiling(mesh.devices.flat[0].platform)
        return _memory(exe)

    def precompile_eval(shape):
        sharding.check_batch_size(shape[0], mesh)
        abstract = sharding.abstract_state_with_shardings(fns, sharded)
        tokens = jax.ShapeDtypeStruct(shape, np.int32, sharding=sharded.batch_sharding)
        exe = sharded.eval_step.lower(abstract.params, tokens).compile()
        compiled_eval[tuple(shape)] = exe
        host_memory.after_compiling(mesh.devices.flat[0].platform)
        mem = _memory(exe)
        if mem is not None:
            mem["resident"] = _bytes_per_device(abstract) - _bytes_per_device(abstract.params)
        return mem

    zero = {0: "off", 1: "ZeRO-1", 3: "FSDP"}[parallel.zero]
    hosts = ""
    if jax.process_count() > 1:  # which process holds each device, in mesh order
        layout = np.vectorize(lambda d: d.process_index)(mesh.devices).tolist()
        hosts = f"; processes of the mesh's devices {layout}"
    return Engine(
        init=sharded.init,
        train_step=step,
        eval_sums=eval_sums,
        abstract_state=lambda: sharding.abstract_state_with_shardings(fns, sharded),
        to_checkpoint=lambda s: s,
        from_checkpoint=lambda s: s,
        description=(
            f"jit over mesh replica={sizes['replica']} data={sizes['data']} "
            f"model={sizes['model']} ({jax.device_count()} devices), optimiser-state "
            f"partitioning {zero}, remat {train_cfg.remat}, precision {train_cfg.precision}{hosts}"
        ),
        precompile=precompile,
        precompile_eval=precompile_eval,
        local_rows=lambda b: sharding.local_rows(mesh, b),  # checks that B divides
        batch_multiple=sizes["replica"] * sizes["data"],
        notes=sharded.notes,
    )


def _pmap_engine(model_cfg, train_cfg, parallel) -> Engine:
    from gopher.config import ConfigError

    # The pmap path is ZeRO-1 by hand over every device, one batch per step: settings it
    # would not honour are refused, not dropped.
    asked = {
        "--config.parallel.zero=3 (FSDP)": parallel.zero == 3,
        f"--config.parallel.data={parallel.data}": parallel.data not in (-1, jax.device_count()),
        f"--config.parallel.replica={parallel.replica}": parallel.replica not in (1, -1),
        f"--config.train.microbatches={train_cfg.microbatches}": train_cfg.microbatches > 1,
        "--config.train.inject_nan_steps": bool(train_cfg.inject_nan_steps),
    }
    refused = [flag for flag, bad in asked.items() if bad]
    if refused:
        raise ConfigError(
            f"{', '.join(refused)} with --config.parallel.mode=pmap, which runs ZeRO-1 by hand "
            "over all devices without gradient accumulation; use --config.parallel.mode=jit"
        )
    from gopher import pmap_train

    p = pmap_train.make_pmap_train(
        model_cfg,
        train_cfg,
        precision=train_cfg.precision,
        remat=train_cfg.remat,
        donate=True,
    )

    def eval_nll(state, batch):
        # pmap's outputs are this process's rows [b, T]: fully addressable here.
        return np.asarray(jax.device_get(p.eval_step(state.params, batch)["nll"]))

    return Engine(
        init=p.init,
        # pmap splits this process's rows over its devices: the global batch is implied.
        train_step=lambda state, batch, global_batch=None: p.train_step(state, batch),
        eval_sums=_sums_from_local_nll(eval_nll),
        # Each shard is saved and restored on the device that holds it, on every process.
        abstract_state=p.abstract_checkpoint,
        to_checkpoint=p.to_checkpoint,
        from_checkpoint=p.from_checkpoint,
        description=(
            f"pmap data parallel over {p.num_devices} devices with optimiser-state "
            f"partitioning by hand, remat {train_cfg.remat}, precision {train_cfg.precision}"
        ),
        batch_multiple=jax.device_count(),
    )
