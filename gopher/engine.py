"""One interface over the two parallel paths, for the host loop and checkpoints.

An Engine owns the jitted (or pmapped) step and knows how to move its state to and
from the checkpoint layout, which is always the single-device `TrainState` pytree
(arrays carrying the jit path's shardings), so a checkpoint written by either path
restores on the other and on any mesh.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gopher import sharding
from gopher import train as train_lib
from gopher.config import ModelConfig, ParallelConfig, TrainConfig


@dataclasses.dataclass
class Engine:
    init: Callable[[jax.Array], Any]
    train_step: Callable[[Any, np.ndarray], tuple[Any, dict]]
    eval_nll: Callable[[Any, np.ndarray], np.ndarray]  # (state, [B, T+1]) -> [B, T]
    abstract_state: Callable[[], Any]  # checkpoint-layout ShapeDtypeStructs with shardings
    to_checkpoint: Callable[[Any], Any]
    from_checkpoint: Callable[[Any], Any]
    description: str
    # jit path: compile the step ahead of time for a batch shape; returns bytes per device
    # {"temp", "argument", "output", "alias"} from XLA's memory analysis, or None.
    precompile: Callable[[tuple[int, int]], dict | None] = lambda shape: None


def available_bytes_per_device() -> int | None:
    """Memory one device may use: the accelerator's limit, or the host's free RAM shared
    by the simulated CPU devices."""
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if dev.platform == "cpu":
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
        return free // max(1, jax.local_device_count())
    return None


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
    fns = train_lib.make_train_functions(
        model_cfg,
        train_cfg,
        precision=train_cfg.precision,
        remat=train_cfg.remat,
        activation_constraint=sharding.activation_constraint(mesh),
        fault_steps=train_cfg.inject_nan_steps,
    )
    sharded = sharding.shard_train(fns, mesh, parallel, model_cfg)
    sizes = sharding.axis_sizes(mesh)

    compiled = {}

    def step(state, batch):
        fn = compiled.get(batch.shape, sharded.train_step)
        return fn(state, sharding.make_global_batch(batch, mesh))

    def eval_nll(state, batch):
        out = sharded.eval_step(state.params, sharding.make_global_batch(batch, mesh))
        return np.asarray(jax.device_get(out["nll"]))

    def precompile(shape):
        sharding.check_batch_size(shape[0] * jax.process_count(), mesh)
        abstract = sharding.abstract_state_with_shardings(fns, sharded)
        tokens = jax.ShapeDtypeStruct(shape, np.int32, sharding=sharded.batch_sharding)
        exe = sharded.train_step.lower(abstract, tokens).compile()
        compiled[tuple(shape)] = exe
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

    zero = {0: "off", 1: "ZeRO-1", 3: "FSDP"}[parallel.zero]
    return Engine(
        init=sharded.init,
        train_step=step,
        eval_nll=eval_nll,
        abstract_state=lambda: sharding.abstract_state_with_shardings(fns, sharded),
        to_checkpoint=lambda s: s,
        from_checkpoint=lambda s: s,
        description=(
            f"jit over mesh replica={sizes['replica']} data={sizes['data']} "
            f"model={sizes['model']} ({jax.device_count()} devices), optimiser-state "
            f"partitioning {zero}, remat {train_cfg.remat}, precision {train_cfg.precision}"
        ),
        precompile=precompile,
    )


def _pmap_engine(model_cfg, train_cfg, parallel) -> Engine:
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
        train_step=p.train_step,
        eval_nll=eval_nll,
        # Each shard is saved and restored on the device that holds it, on every process.
        abstract_state=p.abstract_checkpoint,
        to_checkpoint=p.to_checkpoint,
        from_checkpoint=p.from_checkpoint,
        description=(
            f"pmap data parallel over {p.num_devices} devices with optimiser-state "
            f"partitioning by hand, remat {train_cfg.remat}, precision {train_cfg.precision}"
        ),
    )
