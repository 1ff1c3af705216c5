"""The pmap path with ZeRO-1 against the single-device train step (the oracle)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopher import config, optim, pmap_train, train

MODEL = config.get_preset("test")
STEPS = 20
# AdamW with decay, and a clip norm below the first steps' gradient norms (~0.75), so
# clipping by the global norm (not a shard's) and the decay are both exercised.
TRAIN = config.TrainConfig(
    steps=STEPS,
    batch_size=8,
    warmup_steps=5,
    max_lr=3e-3,
    optimizer="adamw",
    weight_decay=0.1,
    clip_norm=0.6,
)


def _batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, MODEL.vocab_size, (batch_size, MODEL.seq_len + 1)).astype(np.int32)


def _run_single(precision, batch, steps=STEPS):
    fns = train.make_train_functions(MODEL, TRAIN, precision=precision)
    state = fns.init(jax.random.key(0))
    step = jax.jit(fns.train_step)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses, fns


def _run_pmap(pf, batch, steps=STEPS):
    state = pf.init(jax.random.key(0))
    losses = []
    for _ in range(steps):
        state, m = pf.train_step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _per_device_bytes(x):
    """{device: bytes that device holds of the pmapped array x}."""
    out = {}
    for shard in x.addressable_shards:
        out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


@pytest.fixture(scope="module")
def fp32_runs():
    batch = _batch(8)
    pf = pmap_train.make_pmap_train(MODEL, TRAIN, precision="fp32")
    pstate, plosses = _run_pmap(pf, batch)
    sstate, slosses, sfns = _run_single("fp32", batch)
    return pf, pstate, plosses, sfns, sstate, slosses, batch


def test_eight_devices_match_one_device_step_for_step(fp32_runs):
    pf, pstate, plosses, _, sstate, slosses, _ = fp32_runs
    assert pf.num_devices == 8
    assert slosses[-1] < slosses[0] - 1.0  # the run actually trains
    for p, s in zip(plosses, slosses, strict=True):
        assert abs(p - s) / abs(s) < 1e-4
    single = pf.to_single_device(pstate)
    assert int(single.step) == STEPS and int(single.skipped) == 0
    params = jax.tree_util.tree_leaves_with_path(single.params)
    for (path, a), b in zip(params, jax.tree.leaves(sstate.params), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _rel(a, b) < 1e-4, jax.tree_util.keystr(path)
    for a, b in zip(
        jax.tree.leaves(single.opt_state), jax.tree.leaves(sstate.opt_state), strict=True
    ):
        assert a.shape == b.shape
        assert _rel(a, b) < 1e-3


def test_each_device_holds_an_eighth_of_the_adam_moments_and_all_params(fp32_runs):
    pf, pstate, *_ = fp32_runs
    n_params = pf.layout.size
    assert n_params % 8 == 0  # the test preset splits evenly: no padding
    moments = [x for x in jax.tree.leaves(pstate.opt_state) if x.ndim == 2]
    assert len(moments) == 2  # mu and nu
    for x in moments:
        held = _per_device_bytes(x)
        assert len(held) == 8
        assert all(b * 8 == n_params * 4 for b in held.values())  # exactly 1/8 of fp32 N
    for x in jax.tree.leaves(pstate.params):
        held = _per_device_bytes(x)
        assert len(held) == 8 and all(b == x.nbytes // 8 == x[0].nbytes for b in held.values())
        first = np.asarray(x.addressable_shards[0].data)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), first)


def test_init_and_round_trip_through_the_single_device_layout(fp32_runs):
    pf, pstate, _, sfns, *_ = fp32_runs
    single_init = sfns.init(jax.random.key(0))
    from_pmap = pf.to_single_device(pf.init(jax.random.key(0)))
    assert jax.tree.structure(from_pmap) == jax.tree.structure(single_init)
    for a, b in zip(jax.tree.leaves(from_pmap), jax.tree.leaves(single_init), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)
    again = pf.from_single_device(pf.to_single_device(pstate))
    assert jax.tree.structure(again) == jax.tree.structure(pstate)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(pstate), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_eval_step_matches_one_device(fp32_runs):
    pf, pstate, _, sfns, sstate, _, batch = fp32_runs
    nll = pf.eval_step(pstate.params, batch)["nll"]
    ref = jax.jit(sfns.eval_step)(sstate.params, batch)["nll"]
    assert nll.shape == ref.shape == (8, MODEL.seq_len)
    assert _rel(nll, ref) < 1e-4


def test_nonfinite_gradient_skips_the_update_on_every_device(fp32_runs):
    pf, pstate, *_ = fp32_runs
    single = pf.to_single_device(pstate)
    poisoned = single._replace(
        params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), single.params)
    )
    state = pf.from_single_device(poisoned)
    new, m = pf.train_step(state, _batch(8, seed=1))
    assert not math.isfinite(float(m["loss"]))
    assert int(m["skipped"]) == 1
    assert np.all(np.asarray(new.skipped) == 1) and np.all(np.asarray(new.step) == STEPS + 1)
    # The moments are left as they were; the LR schedule's count follows the step.
    moved = optim.advance_schedule(state.opt_state)
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(moved), strict=True):
        np.testing.assert_array_equal(a, b)
    # The parameters are left as they came in (NaN compares equal to NaN here).
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "parallel, train_kw, named",
    [
        (dict(zero=3), {}, "--config.parallel.zero=3 (FSDP)"),
        (dict(data=4), {}, "--config.parallel.data=4"),
        ({}, dict(microbatches=2), "--config.train.microbatches=2"),
        ({}, dict(inject_nan_steps=(3,)), "--config.train.inject_nan_steps"),
    ],
)
def test_settings_the_pmap_path_does_not_honour_are_refused(parallel, train_kw, named):
    """They were dropped: zero=3 ran ZeRO-1, microbatches=4 ran one batch per step."""
    from gopher import engine

    par = config.ParallelConfig(mode="pmap", **parallel)
    with pytest.raises(config.ConfigError) as err:
        engine.build(MODEL, config.TrainConfig(batch_size=8, **train_kw), par)
    line = str(err.value)
    assert named in line and "--config.parallel.mode=jit" in line and "\n" not in line
    assert engine.build(MODEL, config.TrainConfig(batch_size=8), config.ParallelConfig(mode="pmap"))


@pytest.mark.slow  # make test-all; the suite's time budget
def test_uneven_split_pads_and_a_bad_batch_names_the_numbers():
    # 3 devices: N is not a multiple of 3, so the flat vector is padded.
    pf = pmap_train.make_pmap_train(MODEL, TRAIN, devices=jax.devices()[:3])
    assert pf.layout.padded_size > pf.layout.size
    state = pf.init(jax.random.key(0))
    with pytest.raises(ValueError) as err:
        pf.train_step(state, _batch(8))
    msg = str(err.value)
    assert "\n" not in msg and "8" in msg and "3" in msg and "multiple of 3" in msg
    batch = _batch(6)
    _, plosses = _run_pmap(pf, batch, steps=3)
    _, slosses, _ = _run_single("fp32", batch, steps=3)
    for p, s in zip(plosses, slosses, strict=True):
        assert abs(p - s) / abs(s) < 1e-4


@pytest.mark.slow  # make test-all; the suite's time budget
def test_bf16_master_partitions_the_master_and_tracks_fp32(fp32_runs):
    _, _, fp32_losses, *_ = fp32_runs
    pf = pmap_train.make_pmap_train(MODEL, TRAIN, precision="bf16_master")
    state, losses = _run_pmap(pf, _batch(8))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    held = _per_device_bytes(state.master)
    assert state.master.dtype == jnp.float32 and len(held) == 8
    assert all(b * 8 == pf.layout.size * 4 for b in held.values())
    single = pf.to_single_device(state)
    for p, m in zip(jax.tree.leaves(single.params), jax.tree.leaves(single.master), strict=True):
        np.testing.assert_array_equal(p, m.astype(jnp.bfloat16))
    assert losses[-1] < losses[0] - 1.0
    for b, f in zip(losses, fp32_losses, strict=True):
        assert abs(b - f) / f < 0.05


@pytest.mark.slow  # make test-all; the suite's time budget
def test_bf16_sr_rounds_each_shard_and_trains(fp32_runs):
    _, _, fp32_losses, *_ = fp32_runs
    pf = pmap_train.make_pmap_train(MODEL, TRAIN, precision="bf16_sr")
    state, losses = _run_pmap(pf, _batch(8), steps=5)
    assert state.master is None
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    for b, f in zip(losses, fp32_losses[:5], strict=True):
        assert abs(b - f) / f < 0.05


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_to_checkpoint_keeps_each_shard_on_its_device(fp32_runs):
    pf, pstate, *_ = fp32_runs
    ck = pf.to_checkpoint(pstate)
    mu = ck.opt_state[1][0].mu
    assert jax.tree.structure(mu) == jax.tree.structure(ck.params)
    for leaf in jax.tree.leaves(mu):
        # Every device holds its own 1/8 of the moment, nothing more: no gather.
        held = _per_device_bytes(leaf)
        assert len(held) == 8 and all(b * 8 == leaf.nbytes for b in held.values())
        assert math.prod(leaf.sharding.shard_shape(leaf.shape)) * 8 == leaf.size
    for leaf in jax.tree.leaves(ck.params):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    # The values are the pmap state's own: the flat rows, laid out by FlatLayout.
    flat = np.asarray(pf.layout.flatten(mu, jnp.float32))
    np.testing.assert_array_equal(flat, np.asarray(pstate.opt_state[1][0].mu).reshape(-1))
    params0 = jax.tree.map(lambda x: np.asarray(x)[0], pstate.params)
    _assert_trees_equal(ck.params, params0)


def test_pmap_checkpoint_restores_on_a_4x2_jit_mesh_and_back(fp32_runs, tmp_path):
    from gopher import checkpoint as checkpoint_lib
    from gopher import engine as engine_lib

    pf, pstate, *_ = fp32_runs
    pmap_engine = engine_lib.build(MODEL, TRAIN, config.ParallelConfig(mode="pmap"))
    jit_engine = engine_lib.build(MODEL, TRAIN, config.ParallelConfig(data=4, model=2, zero=1))
    ck = checkpoint_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(STEPS, pf.to_checkpoint(pstate), {"step": STEPS})
    step, jit_state, _ = ck.restore_latest(jit_engine.abstract_state())
    assert step == STEPS
    mu = jit_state.opt_state[1][0].mu
    assert not jax.tree.leaves(mu)[0].sharding.is_fully_replicated  # ZeRO-1 on the mesh
    _assert_trees_equal(jit_state.params, jax.tree.map(lambda x: np.asarray(x)[0], pstate.params))
    # The jit path trains on from it, saves, and the pmap path restores that bit for bit.
    jit_state = jit_engine.from_checkpoint(jit_state)
    ck.save(STEPS + 1, jit_engine.to_checkpoint(jit_state), {"step": STEPS + 1})
    step, back, _ = ck.restore_latest(pmap_engine.abstract_state())
    assert step == STEPS + 1
    _assert_trees_equal(pmap_engine.from_checkpoint(back), pstate)
    ck.close()


@pytest.mark.slow  # make test-all; the suite's time budget
def test_bf16_master_checkpoint_round_trip_and_padded_leaves():
    # 3 devices: most leaves do not split into 3 row-major blocks and are gathered.
    pf = pmap_train.make_pmap_train(
        MODEL, TRAIN, precision="bf16_master", devices=jax.devices()[:3]
    )
    state, _ = _run_pmap(pf, _batch(6), steps=2)
    ck = pf.to_checkpoint(state)
    single, _, _ = _run_single("bf16_master", _batch(6), steps=2)
    assert jax.tree.structure(ck) == jax.tree.structure(single)
    _assert_trees_equal(pf.from_checkpoint(ck), state)
    # Restored from an abstract state on one device too (any sharding is accepted).
    _assert_trees_equal(pf.from_checkpoint(jax.device_put(ck, jax.devices()[0])), state)


_TWO_PROCESS_SCRIPT = """
import os, sys
import jax
pid, port, outdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(f"localhost:{port}", 2, pid)
import numpy as np
from gopher import checkpoint as checkpoint_lib, config, engine as engine_lib
from jax.experimental import multihost_utils

MODEL = config.get_preset("test")
TRAIN = config.TrainConfig(steps=4, batch_size=8, warmup_steps=1)
pm = engine_lib.build(MODEL, TRAIN, config.ParallelConfig(mode="pmap"))
state = pm.init(jax.random.key(0))
rng = np.random.default_rng(0)
batch = rng.integers(0, MODEL.vocab_size, (8, MODEL.seq_len + 1)).astype(np.int32)
lo, hi = pm.local_rows(8)
for _ in range(2):
    state, m = pm.train_step(state, batch[lo:hi])
print(pid, "loss", float(m["loss"]), flush=True)
local = lambda s: [np.asarray(x) for x in jax.tree.leaves(s)]
want = local(state)
ck_state = pm.to_checkpoint(state)
mu = jax.tree.leaves(ck_state.opt_state[1][0].mu)[0]
assert not mu.is_fully_addressable and len(mu.addressable_shards) == 4, mu.sharding
ck = checkpoint_lib.Checkpointer(outdir, async_save=True)
ck.save(2, ck_state, {"step": 2}, force=True)
ck.wait()
step, back, _ = ck.restore_latest(pm.abstract_state())
got = local(pm.from_checkpoint(back))
assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
jit = engine_lib.build(MODEL, TRAIN, config.ParallelConfig(data=4, model=2, zero=1))
step, js, _ = ck.restore_latest(jit.abstract_state())
# Two more steps on each path: the first's loss is that of the restored parameters
# (computed before the update); the second's depends on that update, i.e. on the restored
# Adam moments, step count and learning rate as well.
rows = batch[slice(*jit.local_rows(8))]
js2, m2 = jit.train_step(js, rows)
state2, m3 = pm.train_step(state, batch[lo:hi])
js3, m4 = jit.train_step(js2, rows)
state3, m5 = pm.train_step(state2, batch[lo:hi])
for a, b in ((m2, m3), (m4, m5)):
    print(pid, "next loss jit", float(a["loss"]), "pmap", float(b["loss"]), flush=True)
    assert abs(float(a["loss"]) - float(b["loss"])) < 1e-5 * abs(float(b["loss"]))
assert float(m4["loss"]) != float(m2["loss"])  # the update moved the parameters
ck.close()
multihost_utils.sync_global_devices("done")
print(pid, "OK", flush=True)
"""


@pytest.mark.slow  # make test-all; the suite's time budget
def test_two_processes_save_their_own_shards_and_restore_on_either_path(tmp_path):
    """2 processes x 4 CPU devices (gloo): each writes only its addressable shards; the
    checkpoint restores bit for bit on pmap and trains on identically on a 4x2 jit mesh
    (two steps: the second's loss depends on the restored optimiser state)."""
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, str(script)]
    procs = [
        subprocess.Popen(
            [*cmd, str(i), str(port), str(tmp_path / "ck")],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"{i} OK" in out, out[-3000:]
