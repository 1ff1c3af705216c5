"""gopher/attention_cudnn.py on CPU: its arithmetic (the position bias, the batch folded
into the heads, the bias gradient's path back to q, r and v_bias) run through
jax.nn.dot_product_attention's XLA implementation, against the naive oracle that builds
R_{i-j} for every pair, and against the XLA path; the guards, "auto"'s fallback and the
GPU layer unrolling. cuDNN itself runs only on a GPU: `python -m
experiments.bench_attention --check` compares it there (benchmarks/gpu_h200/run4_*)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_attention import _inputs, oracle  # tests/ is on sys.path

from gopher import attention, attention_cudnn, attention_xla, config, sharding, train


def _packed(q, k, v):  # [B, H, T, K] -> [B, T, H*K]
    b, h, t, kd = q.shape
    return [x.transpose(0, 2, 1, 3).reshape(b, t, h * kd) for x in (q, k, v)]


def test_position_bias_is_the_skewed_position_term():
    b, h, t, kd = 2, 3, 9, 4
    q, _, _, r, _, vb = _inputs(b, h, t, kd)
    qv = (q + vb).transpose(0, 2, 1, 3)  # [B, T, H, K]
    got = attention_cudnn.position_bias(qv, r).reshape(h, b, t, t)
    for i in range(t):
        for j in range(i + 1):  # above the diagonal is left over, masked
            want = jnp.einsum("bhk,hk->hb", qv[:, i], r[:, t - (i - j)])
            np.testing.assert_allclose(got[:, :, i, j], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [pytest.param(16, marks=pytest.mark.slow), 13])  # 13: ragged
def test_value_and_six_gradients_match_the_oracle_and_the_xla_path(t):
    b, h, kd = 2, 3, 8
    q, k, v, r, u, vb = _inputs(b, h, t, kd, seed=t)
    cot = jax.random.normal(jax.random.key(1), (b, t, h * kd))

    def packed_oracle(q, k, v, r, u, vb):
        heads = [x.reshape(b, t, h, kd).transpose(0, 2, 1, 3) for x in (q, k, v)]
        out = oracle(*heads, r, u, vb)
        return out.transpose(0, 2, 1, 3).reshape(b, t, h * kd)

    def cudnn_maths(q, k, v, r, u, vb):
        return attention_cudnn.relative_attention(q, k, v, r, u, vb, implementation="xla")

    def xla_path(q, k, v, r, u, vb):
        return attention_xla.relative_attention(q, k, v, r, u, vb, None, 8)

    def value_and_grads(fn):
        out, vjp = jax.vjp(fn, *_packed(q, k, v), r, u, vb)
        return (out, *vjp(cot))

    got = value_and_grads(cudnn_maths)
    for want in (value_and_grads(packed_oracle), value_and_grads(xla_path)):
        for name, g, w in zip(("out", "dq", "dk", "dv", "dr", "du", "dvb"), got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=name)


def test_guards_name_the_problem_and_the_fix():
    bf16 = jnp.bfloat16
    assert attention_cudnn.unsupported(bf16, None, 2048) is None
    for args, match in (
        ((bf16, None, 2048, "cpu"), "needs an NVIDIA GPU, not 'cpu'.*attention=xla"),
        ((bf16, None, 2048, "gpu", "AMD Instinct MI300X"), "NVIDIA GPU, not 'AMD Instinct"),
        ((jnp.float32, None, 2048), "bf16 or fp16 activations, not float32.*precision=mixed"),
        ((bf16, np.ones((4, 4), bool), 4), "causal only.*attention=xla"),
        ((bf16, None, 2047), "even sequence length.*not 2047"),
    ):
        message = attention_cudnn.unsupported(*args)
        assert message is not None and "\n" not in message
        assert re.search(match, message), (args, message)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU, not 'cpu'"):
        attention.attention_layout("cudnn", "cpu")
    config.get_preset("test").replace(attention="cudnn")  # a valid choice (for GPU)


def test_auto_on_gpu_falls_back_to_xla_where_cudnn_cannot_run():
    b, h, t, kd = 2, 2, 12, 4
    q, k, v, r, u, vb = _inputs(b, h, t, kd)
    qkv = jnp.stack(_packed(q, k, v), axis=2)  # [B, T, 3, H*K], fp32: cuDNN cannot
    auto = attention.attention_layout("auto", "gpu")
    got = attention.attend(qkv, r, u, vb, None, 8, auto)
    want = attention_xla.relative_attention(*_packed(q, k, v), r, u, vb, None, 8)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    explicit = attention.AttentionLayout("cudnn", "gpu")  # asked for by name: no fallback
    with pytest.raises(ValueError, match="bf16 or fp16 activations, not float32"):
        attention.attend(qkv, r, u, vb, None, 8, explicit)


def test_auto_unrolls_layers_on_cpu_and_gpu_up_to_their_depths():
    auto = config.TrainConfig(unroll_layers="auto")
    for platform, layers, unrolled in (
        ("cpu", 16, True),
        ("cpu", 17, False),
        ("gpu", 24, True),  # 1.4b: measured faster unrolled on an H200
        ("gpu", 32, False),
        ("tpu", 8, False),
    ):
        cfg = config.get_preset("test").replace(num_layers=layers)
        assert train.unroll_layers(auto, cfg, platform) == unrolled, (platform, layers)
    assert train.unroll_layers(config.TrainConfig(unroll_layers="yes"), cfg, "tpu")


def test_under_a_mesh_each_device_gets_its_own_batch_rows_and_heads(monkeypatch):
    """The cuDNN layout on a (2, 4) data x model mesh: attend runs it in shard_map, each
    device with 2 of the 4 rows and 1 of the 4 heads, and the result is the whole
    arrays' (cuDNN's own call is swapped for jax's XLA attention: this host has no GPU)."""
    cpu_maths = functools.partial(attention_cudnn.relative_attention, implementation="xla")
    monkeypatch.setattr(attention_cudnn, "relative_attention", cpu_maths)
    b, h, t, kd = 4, 4, 16, 8
    q, k, v, r, u, vb = _inputs(b, h, t, kd, dtype=jnp.bfloat16)
    qkv = jnp.stack(_packed(q, k, v), axis=2)  # [B, T, 3, H*K]
    mesh = sharding.make_mesh(config.ParallelConfig(data=2, model=4))
    layout = attention.AttentionLayout("cudnn", "gpu", mesh, sharding.BATCH_AXES)
    jaxpr = str(jax.make_jaxpr(lambda *a: attention.attend(*a, None, 8, layout))(qkv, r, u, vb))
    assert "shard_map" in jaxpr
    assert "bf16[1,16,2,8]" in jaxpr  # per device, [1, T, H*B, K] folded: 1 head x 2 rows
    got = jax.jit(lambda *a: attention.attend(*a, None, 8, layout))(qkv, r, u, vb)
    want = attention_xla.relative_attention(*_packed(q, k, v), r, u, vb, None, 8)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2
    )


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on an NVIDIA GPU only")
def test_on_a_gpu_cudnn_matches_the_xla_path_in_bf16():
    """Where a GPU is at hand: cuDNN's own call, value and six gradients, against the XLA
    path (bf16; the same tolerance as `experiments.bench_attention --check`)."""
    b, h, t, kd = 2, 4, 256, 64
    q, k, v, r, u, vb = _inputs(b, h, t, kd, dtype=jnp.bfloat16)
    args = (*_packed(q, k, v), r, u, vb)

    def value_and_grads(fn):
        def run(*a):
            out, vjp = jax.vjp(fn, *a)
            return (out, *vjp(jnp.ones_like(out)))

        return jax.jit(run)(*args)

    got = value_and_grads(attention_cudnn.relative_attention)
    want = value_and_grads(lambda *a: attention_xla.relative_attention(*a, None, 128))
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.max(np.abs(g - w)) < 5e-2 * np.max(np.abs(w))
