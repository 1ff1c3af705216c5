"""The jit ("pjit") parallel path: mesh, partition rules, ZeRO, sharded train step.

One program runs over a `Mesh(replica, data, model)`; every array of the train state
gets a `NamedSharding` from the partition rules and XLA inserts the collectives.

  replica  copies of the whole state (across slices or pods); the batch is split over it.
  data     data parallelism; with ZeRO-1 the Adam moments and the fp32 master copy are
           also split over it (optimiser-state partitioning), with ZeRO-3 (FSDP) the
           parameters as well.
  model    Megatron tensor parallelism inside each block.

Partition rules are data: an ordered tuple of (regex over the "/"-joined Haiku parameter
path, PartitionSpec); the first match wins and a parameter no rule matches is an error.
A rule's spec names the parameter's own dims; extra leading dims (the [L] axis that
`hk.layer_stack` adds) stay unsharded. An axis that does not divide its dim is dropped
(that dim is replicated) and noted, so any model runs on any mesh.

Shape glossary: B batch, T sequence length, D d_model, H heads, K key size,
F feed-forward size, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gopher import attention as attention_lib
from gopher import train as train_lib
from gopher.config import ModelConfig, ParallelConfig, TrainConfig
from gopher.train import BatchLayout, TrainFunctions, TrainState

MESH_AXES = ("replica", "data", "model")
BATCH_AXES = ("replica", "data")  # the batch dim is split over both

Rules = tuple[tuple[str, P], ...]

# Megatron-style tensor parallelism over "model": the first matmul of each branch is
# split on its output dim (column-parallel), the second on its input dim (row-parallel),
# so each block needs one all-reduce per branch forward and one backward.
GOPHER_RULES: Rules = (
    (r"attn/(q|k|v|r)/w$", P(None, "model")),  # [D, H*K] column-parallel (r is W_R)
    (r"mlp_in/w$", P(None, "model")),  # [D, F] column-parallel
    (r"attn/o/w$", P("model", None)),  # [H*K, D] row-parallel
    (r"mlp_out/w$", P("model", None)),  # [F, D] row-parallel
    (r"attn/(u|v)_bias$", P("model", None)),  # [H, K] on heads, like q
    (r"(^|/)embeddings$", P("model", None)),  # [V, D] tied embedding over vocab
    (r"norm/(scale|offset)$", P()),  # RMSNorm: replicated
)


class UnmatchedParamError(ValueError):
    """A parameter path that no partition rule matches."""


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


def axis_sizes(mesh: Any) -> dict[str, int]:
    """{axis name: size} from a Mesh, an AbstractMesh or a plain mapping."""
    return dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)


# --------------------------------------------------------------- partition rules


def param_path(key_path: Sequence[Any]) -> str:
    """The "/"-joined Haiku path of a leaf, e.g. "lm/layers/block/attn/q/w"."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def match_rule(path: str, rules: Rules = GOPHER_RULES) -> P:
    """The spec of the first rule whose regex matches `path`."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    raise UnmatchedParamError(
        f"parameter {path!r} matches no partition rule; add a (regex, PartitionSpec) "
        f"for it to the rules in gopher/sharding.py"
    )


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entry(axes: Sequence[str]):
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def shard_shape(shape: Sequence[int], spec: P, sizes: Any) -> tuple[int, ...]:
    """The per-device block of a `shape` array under `spec` on a mesh of `sizes`."""
    sizes = axis_sizes(sizes)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for dim, entry in zip(shape, entries, strict=True):
        n = math.prod(sizes[a] for a in _axes(entry))
        if dim % n:
            raise ValueError(f"dim {dim} of {tuple(shape)} does not divide over {entry} ({n})")
        out.append(dim // n)
    return tuple(out)


def megatron_spec(
    path: str, shape: Sequence[int], sizes: dict[str, int], rules: Rules, notes: list[str]
) -> P:
    """The rule's spec for `path`, padded for leading stacked dims; axes that do not
    divide their dim are dropped (and noted)."""
    spec = match_rule(path, rules)
    if len(spec) > len(shape):
        raise ValueError(
            f"partition rule for {path!r} names {len(spec)} dims but the parameter has "
            f"shape {tuple(shape)}; fix the rule in gopher/sharding.py"
        )
    entries = [None] * (len(shape) - len(spec)) + list(spec)
    for i, entry in enumerate(entries):
        axes = _axes(entry)
        n = math.prod(sizes.get(a, 1) for a in axes)
        if axes and shape[i] % n:
            notes.append(f"{path}: dim {i} ({shape[i]}) not divisible by {entry}={n}, replicated")
            entries[i] = None
    return P(*entries)


def add_data_axis(
    path: str, shape: Sequence[int], spec: P, sizes: dict[str, int], notes: list[str]
) -> P:
    """`spec` additionally split over "data" (ZeRO): on the largest dim not yet
    sharded that "data" divides; else on a sharded dim that still divides; else
    the leaf stays replicated over "data" (and is noted)."""
    d = sizes.get("data", 1)
    if d == 1 or not shape:
        return spec
    entries = list(spec) + [None] * (len(shape) - len(spec))
    free = [i for i, e in enumerate(entries) if e is None and shape[i] % d == 0]
    if free:
        i = max(free, key=lambda i: (shape[i], i))
        entries[i] = "data"
        return P(*entries)
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        axes = _axes(entries[i])
        if axes and shape[i] % (math.prod(sizes[a] for a in axes) * d) == 0:
            entries[i] = _entry(axes + ("data",))
            return P(*entries)
    notes.append(f"{path}: no dim of {tuple(shape)} divisible by data={d}, not partitioned")
    return spec


def leaf_specs(
    path: str, shape: Sequence[int], sizes: dict[str, int], zero: int, rules: Rules, notes: list
) -> tuple[P, P]:
    """(the parameter's spec, its optimiser state's spec) at ZeRO stage `zero`: the
    Megatron rule, plus "data" on the state with zero >= 1 and on both with zero 3."""
    spec = megatron_spec(path, shape, sizes, rules, notes)
    state = add_data_axis(path, shape, spec, sizes, notes) if zero else spec
    return (state if zero == 3 else spec), state


@dataclasses.dataclass(frozen=True)
class StateSpecs:
    """PartitionSpecs for a TrainState plus the fallbacks taken while choosing them."""

    specs: TrainState  # a TrainState of PartitionSpecs
    notes: tuple[str, ...]


def state_partition_specs(
    abstract_state: TrainState, mesh: Any, zero: int = 0, rules: Rules = GOPHER_RULES
) -> StateSpecs:
    """PartitionSpecs for every leaf of `abstract_state` (from `jax.eval_shape(init)`).

    params: the Megatron rules (plus "data" with zero=3). opt_state and master: the
    Megatron rules plus "data" with zero>=1; an optimiser-state leaf is matched to its
    parameter by path (optax states mirror the parameter tree) and shape; scalars such
    as Adam's count are replicated. step, rng and skipped are replicated.
    """
    sizes = axis_sizes(mesh)
    notes: list[str] = []
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    param_spec, state_spec = {}, {}
    for key_path, leaf in flat_params:
        path = param_path(key_path)
        param_spec[path], sharded = leaf_specs(path, leaf.shape, sizes, zero, rules, notes)
        state_spec[path] = (tuple(leaf.shape), sharded)
    depths = sorted({len(kp) for kp, _ in flat_params})

    def params_specs(tree):
        return jax.tree_util.tree_map_with_path(lambda kp, _: param_spec[param_path(kp)], tree)

    def state_specs(tree):
        def one(kp, leaf):
            # The parameter whose path is a suffix of this leaf's path, e.g.
            # opt_state[1].mu["lm/layers/block/attn/q"]["w"] -> "lm/layers/block/attn/q/w".
            for n in depths:
                found = state_spec.get(param_path(kp[-n:])) if len(kp) >= n else None
                if found and found[0] == tuple(leaf.shape):
                    return found[1]
            if not leaf.shape:
                return P()
            raise UnmatchedParamError(
                f"optimiser-state leaf {param_path(kp)!r} {tuple(leaf.shape)} matches no "
                f"parameter; add a rule for it in gopher/sharding.py"
            )

        return jax.tree_util.tree_map_with_path(one, tree)

    specs = TrainState(
        params=params_specs(abstract_state.params),
        opt_state=state_specs(abstract_state.opt_state),
        master=state_specs(abstract_state.master),
        step=P(),
        rng=P(),
        skipped=P(),
    )
    # A note per parameter is enough (each is hit once per tree that uses it).
    return StateSpecs(specs, tuple(dict.fromkeys(notes)))


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
