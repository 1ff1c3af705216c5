"""The jit ("pjit") parallel path: mesh, batch placement, ZeRO, sharded train step.

One program runs over a `Mesh(replica, data, model)`; every array of the train state
gets a `NamedSharding` from the partition rules and XLA inserts the collectives.

  replica  copies of the whole state (across slices or pods); the batch is split over it.
  data     data parallelism; with ZeRO-1 the Adam moments and the fp32 master copy are
           also split over it (optimiser-state partitioning), with ZeRO-3 (FSDP) the
           parameters as well.
  model    Megatron tensor parallelism inside each block.

The partition rules, which mesh axes split each parameter and its optimiser state, are
gopher/partition.py's.

Shape glossary: B batch, T sequence length, D d_model, H heads, K key size,
F feed-forward size, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gopher import attention as attention_lib
from gopher import train as train_lib
from gopher.config import ModelConfig, ParallelConfig, TrainConfig
from gopher.partition import (
    GOPHER_RULES,
    Rules,
    axis_sizes,
    leaf_specs,
    param_path,
    shard_shape,
    state_partition_specs,
)
from gopher.train import BatchLayout, TrainFunctions, TrainState

MESH_AXES = ("replica", "data", "model")
BATCH_AXES = ("replica", "data")  # the batch dim is split over both

# ---------------------------------------------------------------------------- mesh


def mesh_shape(parallel: ParallelConfig, num_devices: int) -> tuple[int, int, int]:
    """(replica, data, model) with a -1 resolved to the rest of the devices."""
    sizes = {"replica": parallel.replica, "data": parallel.data, "model": parallel.model}
    known = math.prod(v for v in sizes.values() if v != -1)
    rest = [name for name, v in sizes.items() if v == -1]
    if rest:
        if num_devices % known:
            fixed = " * ".join(f"{n}={v}" for n, v in sizes.items() if v != -1)
            raise ValueError(
                f"mesh {fixed} = {known} does not divide {num_devices} devices; choose "
                f"sizes whose product divides {num_devices} (--config.parallel.*)"
            )
        sizes[rest[0]] = num_devices // known
    shape = (sizes["replica"], sizes["data"], sizes["model"])
    if math.prod(shape) != num_devices:
        r, d, m = shape
        fix = ""
        if num_devices % (r * m) == 0:
            fix = f"; use --config.parallel.data={num_devices // (r * m)}"
        elif num_devices % m == 0:
            fix = f"; use --config.parallel.replica=1 --config.parallel.data={num_devices // m}"
        else:
            fix = "; use --config.parallel.data=-1 with a model size that divides it"
        raise ValueError(
            f"mesh replica*data*model = {r}*{d}*{m} = {r * d * m} but {num_devices} devices{fix}"
        )
    return shape


def make_mesh(parallel: ParallelConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes ("replica", "data", "model") over `devices` (default: all).

    Axis types are Auto (classic pjit semantics): with Explicit axes a Megatron
    row-parallel dot, contracting over a dim sharded on "model", is a type error.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(parallel, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if parallel.device_order == "interleave":
        # Devices of different processes alternate along the flattened mesh, so every
        # model group (the last axis) holds devices of several processes.
        order = sorted(devices, key=lambda d: (_local_position(d, devices), d.process_index))
        return Mesh(np.asarray(order).reshape(shape), MESH_AXES, axis_types=axis_types)
    try:  # topology-aware device order on TPU
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # make_mesh is strict about some device sets (multi-slice, deviceless
        # topologies); a plain reshape is always valid.
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _local_position(device: Any, devices: Sequence[Any]) -> int:
    """The index of `device` among the devices of its own process."""
    mine = [d for d in devices if d.process_index == device.process_index]
    return mine.index(device)


def named_shardings(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens [B, T+1] split over the batch axes."""
    return NamedSharding(mesh, P(BATCH_AXES, None))


def activation_constraint(mesh: Mesh) -> Callable[[jax.Array], jax.Array]:
    """x [B, T, D] -> x constrained to be split over the batch axes at block boundaries."""
    sharding = NamedSharding(mesh, P(BATCH_AXES, None, None))
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def attention_layout(model_cfg: ModelConfig, mesh: Mesh) -> attention_lib.AttentionLayout:
    """model_cfg.attention on `mesh`'s platform; the kernel in shard_map over the mesh
    (XLA cannot partition a Pallas call): batch over the batch axes, heads over model."""
    platform = mesh.devices.flat[0].platform
    return attention_lib.attention_layout(model_cfg.attention, platform, mesh, BATCH_AXES)


def batch_layout(mesh: Mesh, zero: int = 0, rules: Rules = GOPHER_RULES) -> BatchLayout:
    """The batch split over replica * data, for gradient accumulation.

    ZeRO 0 and 1 keep each shard's gradient apart until the microbatch loop ends (one
    shard's activations [b, T, D] are left whole; vmap adds the shard dim over the
    batch axes). ZeRO-3 reduces each microbatch's gradient into the parameter shards.
    The accumulated gradient is pinned to the parameters' Megatron (and ZeRO-3) specs,
    with the shard dim over the batch axes in front when kept per shard.
    """
    sizes = axis_sizes(mesh)
    per_shard = zero != 3
    spec = P(None, None, None) if per_shard else P(BATCH_AXES, None, None)
    sharding = NamedSharding(mesh, spec)

    def grad_constraint(tree):
        def one(key_path, leaf):
            path = param_path(key_path)
            shape = leaf.shape[1:] if per_shard else leaf.shape
            spec = leaf_specs(path, shape, sizes, zero, rules, [])[0]
            if per_shard:
                spec = P(BATCH_AXES, *spec)
            return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))

        return jax.tree_util.tree_map_with_path(one, tree)

    return BatchLayout(
        shards=sizes["replica"] * sizes["data"],
        axis_name=BATCH_AXES,
        constraint=lambda x: jax.lax.with_sharding_constraint(x, sharding),
        per_shard=per_shard,
        grad_constraint=grad_constraint,
    )


def check_batch_size(global_b: int, mesh: Mesh) -> None:
    """One-line error unless the global batch splits evenly over replica * data."""
    sizes = axis_sizes(mesh)
    n = sizes["replica"] * sizes["data"]
    if global_b % n:
        fix = -(-global_b // n) * n
        raise ValueError(
            f"global batch {global_b} is not divisible by replica*data = "
            f"{sizes['replica']}*{sizes['data']} = {n}; use --config.train.batch_size={fix}"
        )


def local_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """The rows [lo, hi) of a global [B, T+1] batch that this process's devices hold.

    With the data axis split across processes each process holds B / processes rows;
    when a model group spans processes (several processes share a data index), those
    processes hold the same rows.
    """
    check_batch_size(global_batch, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch, 1))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    lo, hi = min(starts), max(stops)
    covered = np.zeros(global_batch, bool)
    for a, b in zip(starts, stops, strict=True):
        covered[a:b] = True
    if not covered[lo:hi].all():  # never with the ("replica", "data") row-major mesh
        raise ValueError(
            f"process {jax.process_index()} holds non-contiguous batch rows; use "
            "--config.parallel.device_order=auto"
        )
    return lo, hi


def make_global_batch(
    np_batch: np.ndarray, mesh: Mesh, global_batch: int | None = None
) -> jax.Array:
    """This process's rows [lo, hi) of a [B, T+1] batch -> the global jax.Array [B, T+1].

    `global_batch` (B) defaults to the rows times the process count (the data axis
    split evenly over processes).
    """
    global_b = global_batch or np_batch.shape[0] * jax.process_count()
    check_batch_size(global_b, mesh)
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh), np_batch, (global_b, *np_batch.shape[1:])
    )


# ----------------------------------------------------------------- the jit path


@dataclasses.dataclass(frozen=True)
class ShardedTrain:
    """The train functions jitted over a mesh with the state's shardings."""

    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
    eval_step: Callable[[Any, jax.Array], dict]
    state_sharding: TrainState  # a TrainState of NamedShardings
    batch_sharding: NamedSharding
    mesh: Mesh
    notes: tuple[str, ...]  # fallbacks: axes dropped because they did not divide a dim


def shard_train(
    fns: TrainFunctions,
    mesh: Mesh,
    parallel: ParallelConfig,
    model_cfg: ModelConfig | None = None,
    rules: Rules = GOPHER_RULES,
) -> ShardedTrain:
    """Jits `fns` over `mesh`: init with out_shardings, train_step with in/out
    shardings and the state donated, eval_step with the params' shardings.

    Build `fns` with `activation_constraint=activation_constraint(mesh)` so that
    activations stay split over the batch at block boundaries.
    """
    abstract = jax.eval_shape(fns.init, jax.random.key(0))
    specs = state_partition_specs(abstract, mesh, parallel.zero, rules)
    notes = list(specs.notes)
    m = axis_sizes(mesh)["model"]
    if model_cfg is not None and model_cfg.num_heads % m:
        notes.append(
            f"num_heads {model_cfg.num_heads} not divisible by model={m}: heads are split "
            f"mid-way and XLA reshards inside attention"
        )
    state_sharding = named_shardings(mesh, specs.specs)
    batch = batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    return ShardedTrain(
        init=jax.jit(fns.init, in_shardings=replicated, out_shardings=state_sharding),
        train_step=jax.jit(
            fns.train_step,
            in_shardings=(state_sharding, batch),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            fns.eval_step,
            in_shardings=(state_sharding.params, batch),
            out_shardings=NamedSharding(mesh, P(BATCH_AXES, None)),
        ),
        state_sharding=state_sharding,
        batch_sharding=batch,
        mesh=mesh,
        notes=tuple(notes),
    )


def build_train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    parallel: ParallelConfig,
    mesh: Mesh,
    fault_steps: tuple[int, ...] = (),
) -> tuple[TrainFunctions, ShardedTrain]:
    """The train functions for `train_cfg` (precision, remat, microbatches) jitted over
    `mesh`, with activations and gradient accumulation laid out for it; the Pallas
    attention kernel (model_cfg.attention) runs under shard_map over the mesh."""
    platform = mesh.devices.flat[0].platform
    fns = train_lib.make_train_functions(
        model_cfg,
        train_cfg,
        precision=train_cfg.precision,
        remat=train_cfg.remat,
        activation_constraint=activation_constraint(mesh),
        fault_steps=fault_steps,
        batch_layout=batch_layout(mesh, parallel.zero),
        platform=platform,
        attention=attention_layout(model_cfg, mesh),
    )
    return fns, shard_train(fns, mesh, parallel, model_cfg)


def abstract_state_with_shardings(fns: TrainFunctions, sharded: ShardedTrain) -> TrainState:
    """ShapeDtypeStructs of the train state carrying their shardings (for AOT lowering)."""
    abstract = jax.eval_shape(fns.init, jax.random.key(0))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract,
        sharded.state_sharding,
    )


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """{device: bytes of `tree`'s shards it holds}, read from the arrays' shards."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def abstract_bytes_per_device(abstract_tree: Any, specs: Any, mesh: Any) -> int:
    """Bytes each device holds of `abstract_tree` under `specs` (shard-shape arithmetic)."""
    leaves = jax.tree.leaves(abstract_tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=_is_spec)
    return sum(
        math.prod(shard_shape(a.shape, s, mesh)) * np.dtype(a.dtype).itemsize
        for a, s in zip(leaves, spec_leaves, strict=True)
    )
