"""The pmap state to and from the checkpoint layout, each device keeping its own shard.

The checkpoint layout is `gopher.train.TrainState` with full-shape leaves, the pytree the
jit path saves, so either path restores the other's checkpoints on any mesh. Here it is
assembled from the per-device buffers with `jax.make_array_from_single_device_arrays`,
so no data leaves the device (or process) that holds it, and Orbax writes each shard
from where it lives:

  params, step, rng, skipped, counts  replicated over the n pmap devices, which already
                                      hold one full copy each
  Adam moments, fp32 master           leaf l sharded over a grid of the n devices such
                                      that device p holds the p-th contiguous 1/n of the
                                      leaf in row-major order: exactly the part of its
                                      ZeRO-1 shard that FlatLayout gives it

A leaf whose 1/n pieces are not row-major blocks (its size is not a multiple of n, or it
has e.g. 3 rows on 8 devices) cannot be sharded that way; it is replicated in the
checkpoint layout, gathered leaf by leaf (in practice only small leaves, never the
whole state).

Shape glossary (as in gopher/pmap_train.py):
  n: devices on the pmap axis    S: one device's flat shard, sum of s_l
  s_l: leaf l's entries per device (its size / n, rounded up)
  o_l: where leaf l starts in a device's shard
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gopher import train as train_lib


def block_grid(shape: Sequence[int], n: int) -> tuple[int, ...] | None:
    """Grid (g_0, ..., g_k) over the leading dims such that the n contiguous row-major
    pieces of an array of `shape` are the grid's blocks, in device order; None if none.

    E.g. (2, 4, 16) on 8 devices: (2, 4), each device holding a [1, 1, 16] block.
    """
    lead = 1  # devices already spent on the dims before k; always divides n
    for k, dim in enumerate(shape):
        rest = n // lead
        if dim % rest == 0:
            return (*shape[:k], rest)
        if rest % dim:
            return None
        lead *= dim
    return None


def _by_device(x: jax.Array) -> dict:
    return {s.device: s.data for s in x.addressable_shards}


def _unpad(slab: jax.Array, size: int, shape: tuple, dtype) -> jax.Array:
    """[n, s_l] -> the leaf: drop the padding at the end, restore its shape."""
    return slab.reshape(-1)[:size].reshape(shape).astype(dtype)


class CheckpointLayout:
    """Converts between PmapState (pmap_train) and TrainState in the checkpoint layout."""

    def __init__(self, layout, devices, state_shape, opt_treedef, is_moment, pmap_state_cls):
        self.layout = layout
        self.state_shape = state_shape  # TrainState of ShapeDtypeStructs (one device's init)
        self.opt_treedef, self.is_moment = opt_treedef, is_moment
        self.pmap_state_cls = pmap_state_cls
        devices = list(devices)
        self.n = len(devices)
        self.pos = {d: i for i, d in enumerate(devices)}
        local = [d for d in devices if d.process_index == jax.process_index()]
        line = Mesh(np.array(devices), ("shards",))
        self.replicated = NamedSharding(line, P())
        self.rows = NamedSharding(line, P("shards"))  # [n, ...] one row per device
        # What pmap itself produces and takes: this process's rows [n_local, ...].
        self.pmap = NamedSharding(Mesh(np.array(local), ("data",)), P("data"))
        self.grids = [block_grid(s, self.n) for s in layout.shapes]
        self.leaf_shardings, self.gathers = [], []
        for shape, size, grid in zip(layout.shapes, layout.sizes, self.grids, strict=True):
            if grid is None:
                self.leaf_shardings.append(self.replicated)
                fn = functools.partial(_unpad, size=size, shape=shape, dtype=jnp.float32)
                self.gathers.append(jax.jit(fn, out_shardings=self.replicated))
            else:
                names = tuple(f"g{i}" for i in range(len(grid)))
                mesh = Mesh(np.array(devices).reshape(grid), names)
                self.leaf_shardings.append(NamedSharding(mesh, P(*names)))
                self.gathers.append(None)

    # -- the checkpoint layout's shardings ------------------------------------------------

    def shardings(self) -> train_lib.TrainState:
        """Per-leaf shardings of the checkpoint layout (a TrainState of Shardings)."""
        rep = lambda tree: jax.tree.map(lambda _: self.replicated, tree)  # noqa: E731
        moments = jax.tree.unflatten(self.layout.treedef, self.leaf_shardings)
        s = self.state_shape
        parts = self.opt_treedef.flatten_up_to(s.opt_state)
        parts = [moments if m else rep(p) for p, m in zip(parts, self.is_moment, strict=True)]
        return train_lib.TrainState(
            params=rep(s.params),
            opt_state=jax.tree.unflatten(self.opt_treedef, parts),
            master=None if s.master is None else moments,
            step=self.replicated,
            rng=self.replicated,
            skipped=self.replicated,
        )

    def abstract(self) -> train_lib.TrainState:
        """ShapeDtypeStructs with the shardings to restore a checkpoint onto."""
        return jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            self.state_shape,
            self.shardings(),
        )

    # -- pmap -> checkpoint ----------------------------------------------------------------

    def _replicate(self, x: jax.Array) -> jax.Array:
        """[n_local, ...] equal copies -> [...] replicated, from each device's own copy."""
        bufs, shape = _by_device(x), x.shape[1:]
        order = self.replicated.addressable_devices_indices_map(shape)
        pieces = [bufs[d][0] for d in order]  # [1, ...] -> [...], on device d
        return jax.make_array_from_single_device_arrays(shape, self.replicated, pieces)

    def _unshard(self, x: jax.Array, like: Any) -> Any:
        """[n_local, S] ZeRO-1 shards -> a pytree of full-shape leaves like `like`."""
        bufs, out = _by_device(x), []
        lay = self.layout
        for i, want in enumerate(lay.treedef.flatten_up_to(like)):
            o, s = lay.offsets[i], lay.leaf_shard_sizes[i]
            if self.grids[i] is None:
                order = self.rows.addressable_devices_indices_map((self.n, s))
                slab = jax.make_array_from_single_device_arrays(
                    (self.n, s), self.rows, [bufs[d][:, o : o + s] for d in order]
                )  # [n, s_l]
                out.append(self.gathers[i](slab).astype(want.dtype))
                continue
            sharding = self.leaf_shardings[i]
            block = sharding.shard_shape(want.shape)
            order = sharding.addressable_devices_indices_map(want.shape)
            pieces = [bufs[d][0, o : o + s].reshape(block).astype(want.dtype) for d in order]
            out.append(jax.make_array_from_single_device_arrays(want.shape, sharding, pieces))
        return jax.tree.unflatten(lay.treedef, out)

    def to_checkpoint(self, state) -> train_lib.TrainState:
        """PmapState -> TrainState in the checkpoint layout; no data moves between devices
        (except leaves without a block grid, gathered one by one)."""
        s = self.state_shape
        parts = self.opt_treedef.flatten_up_to(state.opt_state)
        likes = self.opt_treedef.flatten_up_to(s.opt_state)
        parts = [
            self._unshard(p, like) if m else jax.tree.map(self._replicate, p)
            for p, like, m in zip(parts, likes, self.is_moment, strict=True)
        ]
        return train_lib.TrainState(
            params=jax.tree.map(self._replicate, state.params),
            opt_state=jax.tree.unflatten(self.opt_treedef, parts),
            master=None if s.master is None else self._unshard(state.master, s.master),
            step=self._replicate(state.step),
            rng=self._replicate(state.rng),
            skipped=self._replicate(state.skipped),
        )

    # -- checkpoint -> pmap ----------------------------------------------------------------

    def _to_pmap(self, x: jax.Array) -> jax.Array:
        """[...] replicated -> pmap's [n_local, ...], from each device's own copy."""
        bufs = _by_device(x)
        shape = (len(self.pmap.device_set), *x.shape)
        order = self.pmap.addressable_devices_indices_map(shape)
        return jax.make_array_from_single_device_arrays(
            shape, self.pmap, [bufs[d][None] for d in order]
        )

    def _shard(self, tree: Any) -> jax.Array:
        """Full-shape leaves in the checkpoint layout -> this process's [n_local, S] fp32."""
        lay = self.layout
        n_local = len(self.pmap.device_set)
        order = list(self.pmap.addressable_devices_indices_map((n_local, lay.shard_size)))
        per_device = {d: [] for d in order}
        for i, x in enumerate(lay.treedef.flatten_up_to(tree)):
            bufs, s = _by_device(x), lay.leaf_shard_sizes[i]
            for d in order:
                piece = bufs[d].reshape(-1).astype(jnp.float32)  # [s_l], or the whole leaf
                if self.grids[i] is None:  # a replicated leaf: cut this device's 1/n
                    p = self.pos[d]
                    piece = jnp.pad(piece, (0, self.n * s - lay.sizes[i]))[p * s : (p + 1) * s]
                per_device[d].append(piece)
        pieces = [jnp.concatenate(per_device[d])[None] for d in order]  # [1, S] each
        return jax.make_array_from_single_device_arrays(
            (n_local, lay.shard_size), self.pmap, pieces
        )

    def from_checkpoint(self, ts: train_lib.TrainState):
        """TrainState (any sharding; restored onto abstract() it moves nothing) -> PmapState."""
        ts = jax.device_put(ts, self.shardings())  # a no-op when already in the layout
        parts = self.opt_treedef.flatten_up_to(ts.opt_state)
        parts = [
            self._shard(p) if m else jax.tree.map(self._to_pmap, p)
            for p, m in zip(parts, self.is_moment, strict=True)
        ]
        return self.pmap_state_cls(
            params=jax.tree.map(self._to_pmap, ts.params),
            opt_state=jax.tree.unflatten(self.opt_treedef, parts),
            master=None if ts.master is None else self._shard(ts.master),
            step=self._to_pmap(ts.step),
            rng=self._to_pmap(ts.rng),
            skipped=self._to_pmap(ts.skipped),
        )
