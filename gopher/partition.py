"""Partition rules: which mesh axes split each parameter and its optimiser state.

Partition rules are data: an ordered tuple of (regex over the "/"-joined Haiku parameter
path, PartitionSpec); the first match wins and a parameter no rule matches is an error.
A rule's spec names the parameter's own dims; extra leading dims (the [L] axis that
`hk.layer_stack` adds) stay unsharded. An axis that does not divide its dim is dropped
(that dim is replicated) and noted, so any model runs on any mesh.

Mesh axes ("replica", "data", "model") are gopher/sharding.py's: Megatron tensor
parallelism over "model", ZeRO over "data" (stage 1: the optimiser state and the fp32
master copy; stage 3, FSDP: the parameters too).

Shape glossary: D d_model, H heads, K key size, F feed-forward size, V vocabulary,
L layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from gopher.train import TrainState

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


def axis_sizes(mesh: Any) -> dict[str, int]:
    """{axis name: size} from a Mesh, an AbstractMesh or a plain mapping."""
    return dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)


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
        f"for it to the rules in gopher/partition.py"
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
            f"shape {tuple(shape)}; fix the rule in gopher/partition.py"
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
                f"parameter; add a rule for it in gopher/partition.py"
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
