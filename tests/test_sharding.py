"""The jit path: same losses as one device, ZeRO memory per device, the rule table, errors.

Runs on the 8 simulated CPU devices tests/conftest.py asks for.
"""

import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from gopher import config, partition, sharding, train

STEPS = 20
BATCH = 8
MODEL = config.get_preset("test")  # d_model 64, 4 heads, vocab 512, seq 64: divides by 8
TRAIN = config.TrainConfig(steps=STEPS, warmup_steps=5, batch_size=BATCH)


def learnable_batches() -> list[np.ndarray]:
    """Learnable token windows [B, T+1]: arithmetic progressions mod V."""
    rng = np.random.default_rng(0)
    t = np.arange(MODEL.seq_len + 1)
    out = []
    for _ in range(STEPS):
        start = rng.integers(0, MODEL.vocab_size, (BATCH, 1))
        stride = rng.integers(1, 4, (BATCH, 1))
        out.append(((start + stride * t) % MODEL.vocab_size).astype(np.int32))
    return out


def _sharded(data, model, zero, precision="fp32", model_cfg=MODEL):
    parallel = config.ParallelConfig(data=data, model=model, zero=zero)
    mesh = sharding.make_mesh(parallel)
    fns = train.make_train_functions(
        model_cfg, TRAIN, precision, activation_constraint=sharding.activation_constraint(mesh)
    )
    return sharding.shard_train(fns, mesh, parallel, model_cfg)


@pytest.fixture(scope="module")
def one_device():
    """Losses of plain jit on one device (no mesh), and the final eval NLL."""
    fns = train.make_train_functions(MODEL, TRAIN)
    state = jax.jit(fns.init)(jax.random.key(0))
    step = jax.jit(fns.train_step)
    losses = []
    for batch in learnable_batches():
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    nll = np.asarray(jax.jit(fns.eval_step)(state.params, learnable_batches()[0])["nll"])
    return np.array(losses), nll


@pytest.mark.parametrize(
    "data,model,zero",
    # Every mesh shape in `make test`; the other ZeRO settings in `make test-all`.
    [(8, 1, 1), (4, 2, 3), (2, 4, 0), (1, 8, 1)]
    + [
        pytest.param(*p, marks=pytest.mark.slow)
        for p in [(8, 1, 0), (4, 2, 0), (4, 2, 1), (2, 4, 1), (1, 8, 0)]
    ],
)
def test_sharded_training_matches_one_device(one_device, data, model, zero):
    ref_losses, ref_nll = one_device
    sharded = _sharded(data, model, zero)
    state = sharded.init(jax.random.key(0))
    losses = []
    for batch in learnable_batches():
        state, metrics = sharded.train_step(state, sharding.make_global_batch(batch, sharded.mesh))
        losses.append(float(metrics["loss"]))
    losses = np.array(losses)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learns, so the comparison means something
    np.testing.assert_array_less(np.abs(losses - ref_losses) / np.abs(ref_losses), 1e-4)
    # The step keeps the state on its shardings.
    for leaf, want in zip(
        jax.tree.leaves(state), jax.tree.leaves(sharded.state_sharding), strict=True
    ):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    if zero == 3:
        batch = sharding.make_global_batch(learnable_batches()[0], sharded.mesh)
        nll = np.asarray(sharded.eval_step(state.params, batch)["nll"])
        np.testing.assert_allclose(nll, ref_nll, rtol=1e-4, atol=1e-5)


def _fractions(tree, logical_tree=None):
    """Each device's bytes of `tree` as a fraction of the logical bytes."""
    logical = sum(x.nbytes for x in jax.tree.leaves(logical_tree or tree))
    per_device = sharding.bytes_per_device(tree)
    assert len(per_device) == 8
    return np.array(sorted(per_device.values())) / logical


def test_zero1_each_device_holds_an_eighth_of_adam_state_and_master():
    state = _sharded(8, 1, zero=1, precision="bf16_master").init(jax.random.key(0))
    opt = _fractions((state.opt_state, state.master))
    np.testing.assert_allclose(opt, 1 / 8, rtol=0.01)
    # The fp32 copy itself follows the ZeRO-1 sharding, leaf by leaf.
    np.testing.assert_allclose(_fractions(state.master), 1 / 8, rtol=0.01)
    mu = optax.tree.get(state.opt_state, "mu")  # Adam's first moment, wherever in the chain
    for m, a in zip(jax.tree.leaves(state.master), jax.tree.leaves(mu), strict=True):
        assert m.dtype == np.float32 and m.sharding == a.sharding
    # Parameters stay replicated under ZeRO-1 (bf16 for the forward pass).
    np.testing.assert_allclose(_fractions(state.params), 1.0)


def test_fsdp_on_4x2_each_device_holds_an_eighth_of_the_params():
    state = _sharded(4, 2, zero=3, precision="bf16_master").init(jax.random.key(0))
    np.testing.assert_allclose(_fractions(state.params), 1 / 8, rtol=0.01)
    np.testing.assert_allclose(_fractions((state.opt_state, state.master)), 1 / 8, rtol=0.01)


def test_zero0_replicates_over_data_and_splits_over_model():
    state = _sharded(4, 2, zero=0).init(jax.random.key(0))
    frac = _fractions(state.opt_state)
    assert frac.min() >= 0.5 and frac.max() < 0.51  # only the norms are not split over model


def _abstract_state(model_cfg, precision="fp32"):
    fns = train.make_train_functions(model_cfg, config.TrainConfig(), precision)
    return jax.eval_shape(fns.init, jax.random.key(0))


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_every_param_of_every_preset_matches_a_rule(preset):
    state = _abstract_state(config.get_preset(preset))
    for key_path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        partition.match_rule(partition.param_path(key_path))  # raises if unmatched


@pytest.mark.parametrize("zero", [1, 3])
def test_280b_rules_divide_evenly_on_a_256x16_mesh(zero):
    mesh = AbstractMesh((1, 256, 16), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    state = _abstract_state(config.get_preset("280b"), "bf16_master")
    specs = partition.state_partition_specs(state, mesh, zero)
    # Megatron never falls back; ZeRO only for the small [L, H, K] u/v biases.
    assert all("bias" in note and "data=256" in note for note in specs.notes), specs.notes
    flat = zip(
        jax.tree.leaves(state),
        jax.tree.leaves(specs.specs, is_leaf=lambda x: isinstance(x, P)),
        strict=True,
    )
    sharded_bytes = logical = 0
    for leaf, spec in flat:
        block = NamedSharding(mesh, spec).shard_shape(leaf.shape)  # jax's own arithmetic
        factor = [n // b for n, b in zip(leaf.shape, block, strict=True)]
        assert [b * f for b, f in zip(block, factor, strict=True)] == list(leaf.shape)
        assert partition.shard_shape(leaf.shape, spec, mesh) == block
        if len(leaf.shape) == 3 and "model" in str(spec):
            assert math.prod(factor) >= 16  # every matrix is split over model
        if leaf.dtype == np.float32 and leaf.shape:  # Adam moments and the fp32 master
            sharded_bytes += math.prod(block) * 4
            logical += math.prod(leaf.shape) * 4
    assert sharded_bytes / logical == pytest.approx(1 / 4096, rel=0.01)


def test_zero_picks_the_largest_free_dim_that_data_divides():
    sizes = {"replica": 1, "data": 4, "model": 2}
    notes = []
    assert partition.add_data_axis("a", (8, 64, 256), P(), sizes, notes) == P(None, None, "data")
    assert partition.add_data_axis("b", (8, 64, 256), P(None, None, "model"), sizes, notes) == P(
        None, "data", "model"
    )
    assert partition.add_data_axis("c", (3, 16), P(None, "model"), sizes, notes) == P(
        None, ("model", "data")
    )
    assert partition.add_data_axis("d", (3, 6), P(), sizes, notes) == P()
    assert notes == ["d: no dim of (3, 6) divisible by data=4, not partitioned"]


def test_unmatched_param_raises_naming_it():
    leaf = jax.ShapeDtypeStruct((4, 4), np.float32)
    state = _abstract_state(MODEL)
    params = {**state.params, "lm/adapter": {"w": leaf}}
    with pytest.raises(partition.UnmatchedParamError, match="'lm/adapter/w'"):
        partition.state_partition_specs(state._replace(params=params), {"data": 1, "model": 1})


def test_mesh_that_does_not_match_the_devices_is_a_one_line_error():
    with pytest.raises(ValueError) as e:
        sharding.make_mesh(config.ParallelConfig(data=3, model=2))
    assert str(e.value) == (
        "mesh replica*data*model = 1*3*2 = 6 but 8 devices; use --config.parallel.data=4"
    )
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.make_mesh(config.ParallelConfig(data=-1, model=3))
    mesh = sharding.make_mesh(config.ParallelConfig(replica=2, data=-1, model=2))
    assert dict(mesh.shape) == {"replica": 2, "data": 2, "model": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_batch_that_does_not_divide_over_data_is_a_one_line_error():
    mesh = sharding.make_mesh(config.ParallelConfig(data=4, model=2))
    with pytest.raises(ValueError) as e:
        sharding.make_global_batch(np.zeros((6, 65), np.int32), mesh)
    assert str(e.value) == (
        "global batch 6 is not divisible by replica*data = 1*4 = 4; use --config.train.batch_size=8"
    )
    batch = sharding.make_global_batch(np.arange(8 * 65, dtype=np.int32).reshape(8, 65), mesh)
    assert batch.shape == (8, 65) and batch.sharding.spec == P(("replica", "data"), None)
    np.testing.assert_array_equal(np.asarray(batch), np.arange(8 * 65).reshape(8, 65))
