"""The model axis splits the work: per-device FLOPs x devices equal one device's, and the
only activation collectives are Megatron's, read from the compiled programs.

The oracle is the same train step compiled for one device. FLOPs come from
`cost_analysis()` (which counts each loop body once) and from the HLO's dots with the
loops' trip counts (gopher/hlo.py). Shapes are chosen so that T = 96 is no parameter's
dim: a collective whose result has a dim of 96 moves activations, any other moves
parameters (ZeRO-3, the embedding) or their gradients.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from gopher import attention_xla, config, hlo, sharding

# XLA's attention: the checks count dots, and the CPU kernel's matmuls are a custom call
# that neither dot_flops nor cost_analysis sees.
MODEL = config.get_preset("tiny").replace(num_layers=2, seq_len=96, attention="xla")
T, D, BATCH = 96, MODEL.d_model, 32
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]


@pytest.fixture(autouse=True)
def all_heads_at_once(monkeypatch):
    """XLA CPU's attention loops over groups of heads, as many groups as fit its cache
    budget: fewer per device as the mesh splits the batch. cost_analysis counts a loop's
    body once, so its FLOPs compare across meshes only without that loop (dot_flops
    counts the trips; with the loop, the checks below hold too, cost_analysis aside)."""
    monkeypatch.setattr(attention_xla, "CPU_SCORE_BLOCK_BYTES", 1 << 40)


def compile_step(data, model, zero=0, precision="fp32", microbatches=1):
    """(cost_analysis FLOPs per device, hlo.Module) of the train step on a data x model mesh."""
    # The layer loop kept (as on TPU and GPU): the checks below find each layer's collectives
    # inside the forward and backward loops.
    tc = config.TrainConfig(
        batch_size=BATCH, precision=precision, microbatches=microbatches, unroll_layers="no"
    )
    parallel = config.ParallelConfig(data=data, model=model, zero=zero)
    mesh = sharding.make_mesh(parallel, jax.devices()[: data * model])
    fns, sharded = sharding.build_train(MODEL, tc, parallel, mesh)
    state = sharding.abstract_state_with_shardings(fns, sharded)
    tokens = jax.ShapeDtypeStruct((BATCH, T + 1), np.int32, sharding=sharded.batch_sharding)
    exe = sharded.train_step.lower(state, tokens).compile()
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], hlo.Module(exe.as_text())


_ONE_DEVICE = {}


def one_device(zero, precision, microbatches):
    key = (precision, microbatches)  # ZeRO changes nothing on one device
    if key not in _ONE_DEVICE:
        _ONE_DEVICE[key] = compile_step(1, 1, 0, precision, microbatches)
    return _ONE_DEVICE[key]


def is_activation(c: hlo.Collective) -> bool:
    """Moves activations: some dim is a multiple of T (as [b, T, D] or [b*T, D])."""
    return any(d % T == 0 for dims in hlo.array_dims(c.shape) for d in dims)


def check_split(data, model, zero, precision, microbatches):
    flops, module = compile_step(data, model, zero, precision, microbatches)
    flops_1, module_1 = one_device(zero, precision, microbatches)
    n = data * model
    dots, dots_1 = module.dot_flops(), module_1.dot_flops()
    assert dots * n / dots_1 == pytest.approx(1.0, abs=0.05), (dots * n / dots_1, data, model)
    if microbatches == 1:  # cost_analysis counts loop bodies once: comparable only then
        assert flops * n / flops_1 == pytest.approx(1.0, abs=0.05), (flops * n / flops_1,)

    trips = module.while_trip_counts()
    if microbatches > 1:
        assert microbatches in trips.values(), trips  # the K-trip accumulation loop
    # One [b, T, D] block per device in fp32 (XLA CPU reduces bf16 in fp32).
    block = BATCH // data // microbatches * T * D * 4
    colls = module.collectives()
    for c in colls:
        if c.op == "all-gather" and c.loops and is_activation(c):
            assert c.bytes <= block, (c, block)  # no whole-head [B, H, T, K] gathers
    if model > 1:
        # Megatron: per layer and direction, two all-reduces of [b, T, D] over the model
        # group (forward: the row-parallel outputs; backward: the column-parallel inputs).
        layer_loops = [name for name, n in trips.items() if n == MODEL.num_layers]
        assert len(layer_loops) == 2, trips  # forward and backward
        for loop in layer_loops:
            moved = [
                c
                for c in colls
                if c.loops and c.loops[-1] == loop and c.group_size == model and is_activation(c)
            ]
            assert [c.op for c in moved] == ["all-reduce"] * len(moved), moved
            assert 0 < sum(c.bytes for c in moved) <= 2 * block, moved
    if microbatches > 1 and data > 1 and zero != 3:
        # The gradient is reduced once per step: no data-axis collective inside the
        # K-trip accumulation loop (the layer loops have L = 2 trips).
        accumulation = {name for name, n in trips.items() if n == microbatches}
        grad_reduces = [c for c in colls if c.group_size == data and accumulation & set(c.loops)]
        assert not grad_reduces, grad_reduces
    return dots * n / dots_1


@pytest.mark.parametrize("data,model", MESHES)
def test_model_axis_splits_the_work(data, model):
    check_split(data, model, zero=0, precision="fp32", microbatches=1)


# One mesh per combination keeps this in the suite's budget; `slow` runs them all.
@pytest.mark.parametrize(
    "data,model,zero,precision,microbatches",
    [(4, 2, 1, "mixed", 4), (2, 4, 3, "fp32", 4), (1, 8, 1, "fp32", 4), (8, 1, 3, "mixed", 1)],
)
def test_split_with_zero_precision_and_microbatches(data, model, zero, precision, microbatches):
    check_split(data, model, zero, precision, microbatches)


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [1, 4])
@pytest.mark.parametrize("precision", ["fp32", "mixed"])
@pytest.mark.parametrize("zero", [0, 1, 3])
@pytest.mark.parametrize("data,model", MESHES)
def test_split_every_combination(data, model, zero, precision, microbatches):
    check_split(data, model, zero, precision, microbatches)


def test_microbatches_give_the_unaccumulated_loss_and_gradients():
    """K = 1, 2, 4 on a (4, 2) mesh: the same loss and gradients (fp32, relative < 1e-5)."""
    parallel = config.ParallelConfig(data=4, model=2)
    mesh = sharding.make_mesh(parallel, jax.devices()[:8])
    tokens = np.random.default_rng(0).integers(0, MODEL.vocab_size, (BATCH, T + 1), np.int32)
    results = []
    for k in (1, 2, 4):
        tc = config.TrainConfig(batch_size=BATCH, microbatches=k, warmup_steps=0)
        _, sharded = sharding.build_train(MODEL, tc, parallel, mesh)
        state = sharded.init(jax.random.key(0))
        new, metrics = sharded.train_step(state, jax.device_put(tokens, sharded.batch_sharding))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), new.opt_state))
    (loss, norm, opt), others = results[0], results[1:]
    for loss_k, norm_k, opt_k in others:
        assert loss_k == pytest.approx(loss, rel=1e-5)
        assert norm_k == pytest.approx(norm, rel=1e-5)
        # Adam's first moment after one step is (1 - b1) * gradient: compare gradients.
        for a, b in zip(jax.tree.leaves(opt), jax.tree.leaves(opt_k), strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            scale = max(np.abs(a).max(), 1e-30)
            assert np.abs(a - b).max() / scale < 1e-5


def test_hlo_reader_counts_loops():
    """A scan of 3 matmuls: dot FLOPs count the trips, cost_analysis counts the body once."""
    import jax.numpy as jnp

    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0]

    x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    module = hlo.Module(jax.jit(f).lower(x, w).compile().as_text())
    assert 3 in module.while_trip_counts().values()
    assert module.dot_flops() == 3 * 2 * 16 * 32 * 32
    assert math.prod(hlo.array_dims("f32[4,8]{1,0}")[0]) == 32


def test_lowered_dot_flops_count_a_shard_map_body_on_every_device():
    """A shard_map body carries one device's shapes: its matmuls count once per device
    of its manual axes (a scan inside it, once per trip too), against the closed form
    2 M N K of the global product."""
    import jax.numpy as jnp
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def body(a, b):
        return jax.lax.scan(lambda c, _: (c + a @ b, None), jnp.zeros((16, 8)), None, length=3)[0]

    def f(x, w):
        spec = dict(in_specs=(P("data", None), P(None, "model")), out_specs=P("data", "model"))
        y = jax.shard_map(body, mesh=mesh, check_vma=False, **spec)(x, w)  # [64, 16]
        return y @ w.T  # outside the shard_map: global shapes  [64, 32]

    x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    text = jax.jit(f).lower(x, w).as_text()
    assert "manual_computation" in text
    assert hlo.lowered_dot_flops(text) == 3 * 2 * 64 * 16 * 32 + 2 * 64 * 32 * 16
