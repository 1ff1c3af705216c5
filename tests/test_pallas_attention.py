"""The Pallas relative attention (gopher/pallas_attention.py) in interpret mode: forward
and all six gradients against a naive O(T^2) oracle that builds R_{i-j} for every pair
(no rel_shift), and the model trained with attention=pallas against attention=xla on
one device and on a (2, 4) data x model mesh (the kernel inside shard_map)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sharding import BATCH, TRAIN, learnable_batches  # tests/ is on sys.path

from gopher import attention, attention_xla, config, pallas_attention, sharding, train, workdir


def oracle(q, k, v, r, u, v_bias):
    """softmax over j <= i of (q_i+u).k_j + (q_i+v).r[T-(i-j)], in fp32. [B, H, T, K]"""
    q, k, v, r, u, v_bias = (x.astype(jnp.float32) for x in (q, k, v, r, u, v_bias))
    t = q.shape[2]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    r_pair = r[:, t - np.clip(i - j, 0, t)]  # [H, T, T, K]: the encoding of distance i-j
    scores = jnp.einsum("bhik,bhjk->bhij", q + u, k) + jnp.einsum(
        "bhik,hijk->bhij", q + v_bias, r_pair
    )
    scores = jnp.where(j <= i, scores, -jnp.inf)
    return jnp.einsum("bhij,bhjk->bhik", jax.nn.softmax(scores, axis=-1), v)


def _inputs(b, h, t, kd, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = [(b, h, t, kd)] * 3 + [(h, t + 1, kd), (h, 1, kd), (h, 1, kd)]
    scales = [0.5, 1.0, 1.0, 1.0, 0.3, 0.3]
    return [
        (s * jax.random.normal(key, shape)).astype(dtype)
        for key, shape, s in zip(keys, shapes, scales, strict=True)
    ]


def _value_and_grads(fn, args, cot):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cot)


@pytest.mark.parametrize(
    "b,h,t,block,skew,backward",
    [
        (2, 3, 40, 16, "roll", "split"),  # T off the tile, three tiles, several heads
        (1, 2, 10, 16, "shift", "split"),  # T below one tile; the TPU v4 skew
        (1, 2, 24, 16, "gather", "split"),  # the GPU skew, in interpret mode
        (2, 3, 40, 16, "gather", "fused"),  # the GPU's one-kernel backward (atomic adds)
        (1, 2, 10, 16, "roll", "fused"),
    ],
)
def test_kernel_matches_naive_oracle(b, h, t, block, skew, backward):
    args = _inputs(b, h, t, 8)
    opts = pallas_attention.KernelOptions(block, skew, interpret=True, backward=backward)
    cot = jax.random.normal(jax.random.key(1), (b, h, t, 8))

    @jax.jit
    def both(*args):
        kernel = _value_and_grads(
            lambda *a: pallas_attention.relative_attention_heads(*a, opts), args, cot
        )
        return kernel, _value_and_grads(oracle, args, cot)

    (out, grads), (want, want_grads) = both(*args)
    assert float(jnp.max(jnp.abs(out - want))) < 1e-5
    for name, g, w in zip(("q", "k", "v", "r", "u", "v_bias"), grads, want_grads, strict=True):
        scale = float(jnp.max(jnp.abs(w)))
        err = float(jnp.max(jnp.abs(g - w)))
        assert err < 1e-5 * max(scale, 1.0), (name, err, scale)


def test_kernel_bf16_inputs_within_bf16_tolerance():
    """bf16 q, k, v, r: the kernel rounds p and ds to bf16 for its matmuls, as the XLA
    path does; against the fp32 oracle on the same (bf16-valued) inputs."""
    args = _inputs(2, 2, 40, 8, jnp.bfloat16)
    opts = pallas_attention.KernelOptions(16, "roll", interpret=True)
    out = jax.jit(lambda *a: pallas_attention.relative_attention_heads(*a, opts))(*args)
    assert out.dtype == jnp.bfloat16
    want = oracle(*args)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - want))) < 3e-2


@pytest.mark.parametrize("chunk", [64, 16])  # one query chunk; three
def test_xla_path_bf16_gradients_within_bf16_tolerance(chunk):
    """The XLA path the kernel is benchmarked against, in bf16 (as on TPU/GPU, run here on
    CPU): value and all six gradients against the fp32 oracle on the same inputs. With
    one query chunk XLA CPU once got a bf16 dot with a transposed operand and failed."""
    b, h, t, kd = 2, 2, 40, 8
    args = _inputs(b, h, t, kd, jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(1), (b, h, t, kd))

    def packed(x):  # [B, H, T, K] -> [B, T, H*K]
        return x.transpose(0, 2, 1, 3).reshape(b, t, h * kd)

    def xla(q, k, v, r, u, v_bias):
        out = attention_xla.relative_attention(
            packed(q), packed(k), packed(v), r, u, v_bias, None, chunk
        )
        return out.reshape(b, t, h, kd).transpose(0, 2, 1, 3)

    got = jax.jit(lambda *a: _value_and_grads(xla, a, cot.astype(jnp.bfloat16)))(*args)
    f32 = [x.astype(jnp.float32) for x in args]
    want = jax.jit(lambda *a: _value_and_grads(oracle, a, cot))(*f32)
    for name, g, w in zip(
        ("out", *"qkvr", "u", "v_bias"), jax.tree.leaves(got), jax.tree.leaves(want), strict=True
    ):
        assert g.dtype == jnp.bfloat16, name
        err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
        assert err < 3e-2 * max(float(jnp.max(jnp.abs(w))), 1.0), (name, err)


def test_kernel_is_causal_only():
    q = jnp.zeros((1, 8, 16))
    r, u = jnp.zeros((2, 9, 8)), jnp.zeros((2, 1, 8))
    with pytest.raises(ValueError, match="causal only"):
        pallas_attention.relative_attention(q, q, q, r, u, u, jnp.ones((8, 8), bool))


def test_attention_choice_is_validated():
    with pytest.raises(
        config.ConfigError, match="attention = 'flash'.*auto, xla, pallas, pallas_f"
    ):
        config.get_preset("test").replace(attention="flash")
    assert attention.attention_layout("auto", "tpu").implementation == "pallas"
    on_gpu = attention.attention_layout("auto", "gpu")  # cuDNN, XLA where it cannot run
    assert (on_gpu.implementation, on_gpu.fallback) == ("cudnn", "xla")
    assert attention.attention_layout("pallas", "gpu").implementation == "pallas"
    on_cpu = attention.attention_layout("auto", "cpu")  # the C++ kernel, XLA where it cannot
    assert (on_cpu.implementation, on_cpu.fallback) == ("cpu", "xla")
    with pytest.raises(ValueError, match="'pallas_fused' needs atomic adds.*attention=pallas"):
        attention.attention_layout("pallas_fused", "tpu")
    # The skew by TPU generation; TPU v3 takes the XLA path (no bf16 matmul in Mosaic there).
    assert pallas_attention.options_for("tpu", device_kind="TPU v4").skew == "shift"
    assert pallas_attention.options_for("tpu", device_kind="TPU v5 lite").skew == "roll"
    with pytest.raises(ValueError, match="TPU v4 or later.*attention=xla"):
        pallas_attention.options_for("tpu", device_kind="TPU v3")
    v3_mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(device_kind="TPU v3")]))
    assert attention.attention_layout("auto", "tpu", v3_mesh).implementation == "xla"


def test_switching_attention_on_resume_is_the_same_experiment(tmp_path):
    model = {"preset": "test", "seq_len": 64}
    workdir.record_config(str(tmp_path), {"model": model})  # a run from before the field
    workdir.record_config(str(tmp_path), {"model": {**model, "attention": "pallas"}})
    workdir.record_config(str(tmp_path), {"model": {**model, "attention": "xla"}})
    with pytest.raises(ValueError, match="different experiment"):
        workdir.record_config(str(tmp_path), {"model": {**model, "seq_len": 32}})


# ------------------------------------------------------------- the model, trained
# The model, recipe and token windows of test_sharding's one-device-vs-mesh check.


def _losses(impl: str, mesh_shape: tuple[int, int] | None) -> np.ndarray:
    model_cfg = config.get_preset("test").replace(attention=impl)
    if mesh_shape is None:
        fns = train.make_train_functions(model_cfg, TRAIN)
        state, step = jax.jit(fns.init)(jax.random.key(0)), jax.jit(fns.train_step)
        put = jnp.asarray
    else:
        parallel = config.ParallelConfig(data=mesh_shape[0], model=mesh_shape[1])
        mesh = sharding.make_mesh(parallel)
        _, sharded = sharding.build_train(model_cfg, TRAIN, parallel, mesh)
        state, step = sharded.init(jax.random.key(0)), sharded.train_step

        def put(batch):
            return sharding.make_global_batch(batch, mesh)

    losses = []
    for batch in learnable_batches():
        state, metrics = step(state, put(batch))
        losses.append(float(metrics["loss"]))
    return np.array(losses)


@pytest.fixture(scope="module")
def xla_losses():
    """attention=xla on one device (test_sharding checks the meshes give its losses)."""
    return _losses("xla", None)


@pytest.mark.parametrize(
    "impl, mesh_shape", [("pallas", None), ("pallas", (2, 4)), ("pallas_fused", None)]
)
def test_model_trains_to_the_same_losses_as_xla(xla_losses, impl, mesh_shape):
    pallas = _losses(impl, mesh_shape)
    assert xla_losses[-1] < xla_losses[0] - 0.5  # it learns, so the comparison means something
    np.testing.assert_array_less(np.abs(pallas - xla_losses) / np.abs(xla_losses), 1e-4)


def test_kernel_runs_under_shard_map_on_its_heads():
    """Under a (2, 4) mesh the train step holds the kernel inside a shard_map that
    gives each device its own heads (1 of the test preset's 4) and batch rows."""
    model_cfg = config.get_preset("test").replace(attention="pallas")
    parallel = config.ParallelConfig(data=2, model=4)
    mesh = sharding.make_mesh(parallel)
    fns, sharded = sharding.build_train(model_cfg, TRAIN, parallel, mesh)
    state = sharding.abstract_state_with_shardings(fns, sharded)
    tokens = jax.ShapeDtypeStruct(
        (BATCH, model_cfg.seq_len + 1), jnp.int32, sharding=sharded.batch_sharding
    )
    jaxpr = str(jax.make_jaxpr(sharded.train_step)(state, tokens))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    # q [4 rows, 64 tokens, 1 head x 16] per device: the kernel's [B, H, T, K] input.
    assert "f32[4,1,64,16]" in jaxpr


def test_triton_lowering_of_all_four_kernels_without_pipelining():
    """The GPU path lowered for CUDA on this CPU (no GPU needed): the forward and the three
    backward kernels become Triton calls with one pipelining stage. On an H200 two stages
    gave NaN gradients at K = 64 and overflowed shared memory at K = 128 (README "On a
    GPU"); interpret mode cannot see that, so the lowering's parameters are checked here."""
    import re

    opts = pallas_attention.options_for("gpu")
    assert (opts.skew, opts.block, opts.stages, opts.interpret) == ("gather", 64, 1, False)
    b, t, h, kd = 1, 100, 2, 128
    shapes = [(b, t, h * kd)] * 3 + [(h, t + 1, kd), (h, 1, kd), (h, 1, kd)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]

    def kernels(opts):  # (name, stages, warps) of each Triton call, value and six gradients
        def value_and_grads(*a):
            out, vjp = jax.vjp(lambda *x: pallas_attention.relative_attention(*x, opts=opts), *a)
            return (out, *vjp(jnp.ones_like(out)))

        lowered = jax.jit(value_and_grads).trace(*args).lower(lowering_platforms=("cuda",))
        found = re.findall(
            r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+)', lowered.as_text()
        )
        return sorted(found)

    want = ["_forward_kernel", "_dq_kernel", "_dkdv_kernel", "_dr_kernel"]
    assert kernels(opts) == sorted((name, "1", "4") for name in want)
    two = pallas_attention.options_for("gpu", stages=2)
    assert kernels(two) == sorted((name, "2", "4") for name in want)
    # The one-kernel backward (atomic adds into dq and the d r windows) lowers too.
    fused = pallas_attention.options_for("gpu", backward="fused", warps=8)
    assert kernels(fused) == [("_forward_kernel", "1", "8"), ("_fused_kernel", "1", "8")]


def test_fused_backward_is_refused_where_there_are_no_atomics():
    with pytest.raises(ValueError, match="backward = 'fused' needs atomic adds"):
        pallas_attention.KernelOptions(128, "roll", backward="fused")
    with pytest.raises(ValueError, match="backward = 'both' is unknown"):
        pallas_attention.KernelOptions(64, "gather", backward="both")
