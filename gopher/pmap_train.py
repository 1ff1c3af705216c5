"""Data parallelism as Gopher wrote it: jax.pmap with optimiser-state partitioning by hand.

Every device holds a full copy of the parameters (in the policy's parameter dtype) and
computes the loss and fp32 gradients on its slice of the batch. The gradients are then
flattened into one vector and reduce-scattered, so each device receives the average
gradient for its 1/n of the parameters only; it keeps the Adam moments (and, for
bf16_master, the fp32 master copy) for that shard alone, updates the shard, and the new
parameters are all-gathered back into full copies (ZeRO-1: Gopher Sec. C, Rajbhandari et
al. 2020). Clipping uses the global gradient norm, summed over the shards, so the update is
the one the single-device optax chain (gopher/optim.py) would make.

`to_checkpoint` turns the state into the `gopher.train.TrainState` pytree that
`make_train_functions` uses, with each shard left on its device (gopher/pmap_checkpoint.py),
so checkpoints of either path restore on the other without gathering onto one device.

Shape glossary:
  n: devices on the pmap axis    B: global batch, b = B / n per device
  T: sequence length             N: parameter count
  s_l: leaf l's entries per device, its size / n rounded up (the leaf padded to n * s_l)
  S: shard size, the sum of s_l      P: n * S, the flat vector (N plus padding)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gopher import model as model_lib
from gopher import optim, pmap_checkpoint
from gopher import precision as precision_lib
from gopher import train as train_lib
from gopher.config import ModelConfig, TrainConfig

AXIS = "data"


class PmapState(NamedTuple):
    """TrainState's fields, laid out for pmap (a leading [n] axis on every leaf)."""

    params: Any  # [n, ...] per leaf: a full copy on each device, policy param dtype
    opt_state: Any  # the optax chain's state over a flat shard: mu, nu [n, S]; counts [n]
    master: Any  # [n, S] fp32 shard of the master copy for bf16_master, else None
    step: jax.Array  # [n] int32
    rng: jax.Array  # [n] keys
    skipped: jax.Array  # [n] int32


class FlatLayout:
    """How a parameter pytree maps onto one flat vector of P = n * S entries.

    The vector is laid out by shard: device d's S entries are the d-th 1/n of every
    leaf in turn (leaf l padded up to n * s_l entries), so each device's ZeRO-1 shard is
    a contiguous row-major block of each leaf and can be checkpointed where it lives.
    """

    def __init__(self, params_shape: Any, num_shards: int):
        leaves, self.treedef = jax.tree.flatten(params_shape)
        self.num_shards = num_shards  # n
        self.shapes = [tuple(x.shape) for x in leaves]
        self.dtypes = [x.dtype for x in leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)  # N
        self.leaf_shard_sizes = [-(-s // num_shards) for s in self.sizes]  # s_l
        self.offsets = np.cumsum([0, *self.leaf_shard_sizes[:-1]]).tolist()  # o_l in [S]
        self.shard_size = sum(self.leaf_shard_sizes)  # S
        self.padded_size = self.shard_size * num_shards  # P

    def flatten(self, tree: Any, dtype) -> jax.Array:
        """pytree -> [P] in `dtype`: row d of [n, S] is every leaf's d-th 1/n."""
        n, cols = self.num_shards, []
        leaves = self.treedef.flatten_up_to(tree)
        for x, size, s in zip(leaves, self.sizes, self.leaf_shard_sizes, strict=True):
            flat = jnp.pad(x.astype(dtype).reshape(-1), (0, n * s - size))
            cols.append(flat.reshape(n, s))  # [n, s_l]
        return jnp.concatenate(cols, axis=1).reshape(-1)  # [n, S] -> [P]

    def unflatten(self, flat: jax.Array, dtype=None) -> Any:
        """[P] -> pytree; each leaf in `dtype`, or in its own dtype if None."""
        rows = flat.reshape(self.num_shards, self.shard_size)  # [n, S]
        out = []
        for shape, size, s, o, leaf_dtype in zip(
            self.shapes, self.sizes, self.leaf_shard_sizes, self.offsets, self.dtypes, strict=True
        ):
            leaf = rows[:, o : o + s].reshape(-1)[:size].reshape(shape)
            out.append(leaf.astype(dtype or leaf_dtype))
        return jax.tree.unflatten(self.treedef, out)


def clip_by_global_norm(shard: jax.Array, global_norm: jax.Array, max_norm: float) -> jax.Array:
    """optax.clip_by_global_norm's arithmetic, given the norm over every shard."""
    return lax.select(global_norm < max_norm, shard, (shard / global_norm) * max_norm)


class PmapTrainFunctions(NamedTuple):
    init: Callable[[jax.Array], PmapState]
    train_step: Callable[[PmapState, Any], tuple[PmapState, dict]]
    eval_step: Callable[[Any, Any], dict]  # (state.params, tokens [B, T+1]) -> {"nll": [B, T]}
    # The checkpoint layout (TrainState, as the jit path saves) with each shard kept on
    # its device (gopher/pmap_checkpoint.py); abstract_checkpoint gives its
    # ShapeDtypeStructs with shardings, to restore onto.
    to_checkpoint: Callable[[PmapState], train_lib.TrainState]
    from_checkpoint: Callable[[train_lib.TrainState], PmapState]
    abstract_checkpoint: Callable[[], train_lib.TrainState]
    to_single_device: Callable[[PmapState], train_lib.TrainState]  # tests: one device
    from_single_device: Callable[[train_lib.TrainState], PmapState]  # = from_checkpoint
    num_devices: int
    layout: FlatLayout
    forward: Any  # hk.Transformed


def make_pmap_train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    precision: str = "fp32",
    remat: str = "none",
    devices: Sequence[jax.Device] | None = None,
    donate: bool = False,
) -> PmapTrainFunctions:
    """Builds the pmap data-parallel functions with ZeRO-1 over `devices` (default: all).

    `donate=True` lets train_step reuse the input state's buffers (the caller must not
    touch the old state afterwards).
    """
    policy = precision_lib.get_policy(precision)
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)  # the collectives span every device, across processes too
    local = [d for d in devices if d.process_index == jax.process_index()]
    n_local = len(local)
    single = train_lib.make_train_functions(model_cfg, train_cfg, precision, remat)
    forward = single.forward
    schedule = optim.learning_rate_schedule(model_cfg, train_cfg)
    max_norm = optim.clip_norm(model_cfg, train_cfg)
    optimizer = optim.make_optimizer(model_cfg, train_cfg)
    rule = optim.make_update_rule(model_cfg, train_cfg)

    state_shape = jax.eval_shape(single.init, jax.random.key(0))
    layout = FlatLayout(state_shape.params, n)
    shard_spec = jax.ShapeDtypeStruct((layout.shard_size,), jnp.float32)
    opt_template = jax.eval_shape(optimizer.init, shard_spec)
    if jax.tree.structure(opt_template) != jax.tree.structure(
        (optax.EmptyState(), jax.eval_shape(rule.init, shard_spec))
    ):
        raise RuntimeError(
            "optim.make_optimizer no longer starts with clip_by_global_norm followed by "
            "optim.make_update_rule; keep the two in step"
        )
    opt_treedef = jax.tree.structure(opt_template)
    # Which leaves of the optimiser state are parameter-shaped (moments), not counts.
    is_moment = [x.shape == (layout.shard_size,) for x in jax.tree.leaves(opt_template)]

    def local_shard(flat: jax.Array) -> jax.Array:  # [P] -> this device's [S]
        start = lax.axis_index(AXIS) * layout.shard_size
        return lax.dynamic_slice_in_dim(flat, start, layout.shard_size)

    def partition(ts: train_lib.TrainState) -> PmapState:
        """Inside pmap: one device's part of a single-device TrainState."""
        parts = opt_treedef.flatten_up_to(ts.opt_state)
        parts = [
            local_shard(layout.flatten(p, jnp.float32)) if moment else p
            for p, moment in zip(parts, is_moment, strict=True)
        ]
        master = local_shard(layout.flatten(ts.master, jnp.float32)) if policy.fp32_master else None
        return PmapState(
            ts.params, jax.tree.unflatten(opt_treedef, parts), master, ts.step, ts.rng, ts.skipped
        )

    def loss_fn(params, tokens):  # tokens [b, T+1]
        logits = forward.apply(params, tokens[:, :-1])  # [b, T, V] fp32
        return model_lib.cross_entropy(logits, tokens[:, 1:]).mean()

    def step(state: PmapState, tokens: jax.Array) -> tuple[PmapState, dict]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
        loss = lax.pmean(loss, AXIS)
        flat_grads = layout.flatten(grads, jnp.float32)  # [P]
        # Each device gets the batch-mean gradient for its own 1/n of the parameters.
        grads = lax.psum_scatter(flat_grads, AXIS, scatter_dimension=0, tiled=True) / n  # [S]
        grad_norm = jnp.sqrt(lax.psum(jnp.sum(jnp.square(grads)), AXIS))
        grads = clip_by_global_norm(grads, grad_norm, max_norm)

        if policy.fp32_master:
            base = state.master  # [S] fp32
        else:  # the optax chain sees the stored params, as in train.py
            base = local_shard(layout.flatten(state.params, policy.param_dtype))
        updates, rule_state = rule.update(grads, state.opt_state[1], base)
        opt_state = (state.opt_state[0], rule_state)
        new_base = base.astype(jnp.float32) + updates
        master = new_base if policy.fp32_master else None
        if policy.stochastic_rounding and policy.param_dtype == jnp.bfloat16:
            key = jax.random.fold_in(
                jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS)
            )
            shard = precision_lib.stochastic_round(new_base, key)
        else:
            shard = new_base.astype(policy.param_dtype)
        params = layout.unflatten(lax.all_gather(shard, AXIS, tiled=True))  # [P] -> pytree

        # A non-finite loss or gradient skips the update (and is counted); both values
        # are the same on every device, so every device makes the same choice.
        new = PmapState(params, opt_state, master, state.step + 1, state.rng, state.skipped)
        state = train_lib.keep_finite_update(new, state, loss, grad_norm)
        # Reduced over devices (pmax of equal values marks them replicated), so the
        # metrics come back from pmap as plain scalars, as from train.py.
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lax.pmax(schedule(state.step - 1), AXIS),
            "skipped": lax.pmax(state.skipped, AXIS),
        }
        return state, metrics

    pmap_kw = {"axis_name": AXIS, "devices": devices}
    step_p = jax.pmap(step, out_axes=(0, None), donate_argnums=(0,) if donate else (), **pmap_kw)
    # in_axes None broadcasts the argument; the dummy [n] argument gives pmap its axis size.
    init_p = jax.pmap(lambda key, _: partition(single.init(key)), in_axes=(None, 0), **pmap_kw)
    eval_p = jax.pmap(single.eval_step, **pmap_kw)

    def split_batch(tokens) -> jax.Array:  # [B, T+1] -> [n, b, T+1]
        batch = tokens.shape[0]
        if batch % n_local:
            raise ValueError(
                f"batch size {batch} is not divisible by the {n_local} devices of the pmap "
                f"path; use a batch size that is a multiple of {n_local} "
                f"(e.g. --config.train.batch_size={max(n_local, batch - batch % n_local)})"
            )
        return np.asarray(tokens).reshape(n_local, batch // n_local, *tokens.shape[1:])

    def init(rng: jax.Array) -> PmapState:
        """The same initial state as make_train_functions' init(rng), partitioned."""
        return init_p(rng, np.zeros(n_local, np.int32))

    def train_step(state: PmapState, tokens) -> tuple[PmapState, dict]:
        return step_p(state, split_batch(tokens))

    def eval_step(params, tokens) -> dict:
        """Per-token NLL [B, T] from the replicated params (state.params)."""
        out = eval_p(params, split_batch(tokens))  # [n, b, T]
        return {"nll": out["nll"].reshape(-1, out["nll"].shape[-1])}

    ckpt = pmap_checkpoint.CheckpointLayout(
        layout, devices, state_shape, opt_treedef, is_moment, PmapState
    )

    def to_single_device(state: PmapState) -> train_lib.TrainState:
        """The checkpoint layout gathered onto one device: for tests, on one process."""
        if jax.process_count() > 1:
            raise NotImplementedError(
                "to_single_device gathers on one process; use to_checkpoint, which keeps "
                "each shard on its device"
            )
        return jax.device_put(ckpt.to_checkpoint(state), jax.devices()[0])

    return PmapTrainFunctions(
        init=init,
        train_step=train_step,
        eval_step=eval_step,
        to_checkpoint=ckpt.to_checkpoint,
        from_checkpoint=ckpt.from_checkpoint,
        abstract_checkpoint=ckpt.abstract,
        to_single_device=to_single_device,
        from_single_device=ckpt.from_checkpoint,
        num_devices=n,
        layout=layout,
        forward=forward,
    )
