"""The fused output layer + cross-entropy against autodiff of the plain logits path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopher import loss as loss_lib
from gopher.model import cross_entropy


def _naive(h, emb, targets):
    logits = jnp.einsum("btd,vd->btv", h, emb.astype(h.dtype), preferred_element_type=jnp.float32)
    return cross_entropy(logits, targets).mean()


@pytest.mark.parametrize("t", [5, 128, 300])  # below one chunk, one chunk, 2 chunks + a tail
def test_value_and_gradients_equal_autodiff_of_the_logits(t):
    k1, k2, k3 = jax.random.split(jax.random.key(t), 3)
    h = jax.random.normal(k1, (3, t, 16), jnp.float32)
    emb = 0.5 * jax.random.normal(k2, (97, 16), jnp.float32)
    targets = jax.random.randint(k3, (3, t), 0, 97)
    want, (dh_want, de_want) = jax.value_and_grad(_naive, argnums=(0, 1))(h, emb, targets)
    got, (dh, de) = jax.jit(jax.value_and_grad(loss_lib.lm_head_loss, argnums=(0, 1)))(
        h, emb, targets
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(dh, dh_want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(de, de_want, rtol=1e-5, atol=1e-8)


def test_cotangent_scales_and_bf16_hidden_states():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (2, 40, 32), jnp.float32)
    emb = 0.3 * jax.random.normal(k2, (50, 32), jnp.float32)
    targets = jax.random.randint(k3, (2, 40), 0, 50)
    # 3 x the loss: the backward pass scales the forward's gradient by the cotangent.
    g = jax.grad(lambda e: 3.0 * loss_lib.lm_head_loss(h, e, targets))(emb)
    np.testing.assert_allclose(
        g, 3.0 * jax.grad(lambda e: _naive(h, e, targets))(emb), rtol=1e-5, atol=1e-8
    )
    hb = h.astype(jnp.bfloat16)
    got = loss_lib.lm_head_loss(hb, emb, targets)
    dh = jax.grad(loss_lib.lm_head_loss)(hb, emb, targets)
    assert dh.dtype == jnp.bfloat16
    np.testing.assert_allclose(got, _naive(hb, emb, targets), rtol=1e-3)
    np.testing.assert_allclose(
        dh.astype(jnp.float32),
        jax.grad(_naive)(hb, emb, targets).astype(jnp.float32),
        rtol=5e-2,
        atol=2e-4,
    )


@pytest.mark.parametrize("t", [40, 150])  # one chunk (bf16 once failed to run there); 2 + a tail
def test_bf16_hidden_states_both_gradients(t):
    """bf16 h (mixed precision): the loss and its gradients in h and in the fp32
    embeddings against autodiff of the logits path on the same bf16 inputs."""
    k1, k2, k3 = jax.random.split(jax.random.key(t), 3)
    h = jax.random.normal(k1, (2, t, 32), jnp.float32).astype(jnp.bfloat16)
    emb = 0.3 * jax.random.normal(k2, (50, 32), jnp.float32)
    targets = jax.random.randint(k3, (2, t), 0, 50)
    fused = jax.jit(jax.value_and_grad(loss_lib.lm_head_loss, argnums=(0, 1)))
    got, (dh, de) = fused(h, emb, targets)
    want, (dh_want, de_want) = jax.value_and_grad(_naive, argnums=(0, 1))(h, emb, targets)
    assert (dh.dtype, de.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-3)
    for g, w in ((dh, dh_want), (de, de_want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.max(np.abs(g - w)) < 2e-2 * np.max(np.abs(w)), np.max(np.abs(g - w))


def test_train_step_gradient_equals_the_logits_path():
    from gopher import config as config_lib
    from gopher import model as model_lib
    from gopher import train as train_lib

    cfg = config_lib.get_preset("test")
    fns = train_lib.make_train_functions(cfg, config_lib.TrainConfig(steps=10, batch_size=4))
    state = fns.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    plain = train_lib.mean_loss(model_lib.build_forward(cfg))  # logits, then cross_entropy
    fused = train_lib.mean_loss(model_lib.build_forward(cfg, hidden=True))
    l1, g1 = jax.jit(jax.value_and_grad(plain))(state.params, tokens)
    l2, g2 = jax.jit(jax.value_and_grad(fused))(state.params, tokens)
    np.testing.assert_allclose(l2, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-7)


def test_unrolled_layer_loop_computes_the_same_step():
    from gopher import config as config_lib
    from gopher import train as train_lib

    cfg = config_lib.get_preset("test")
    tokens = jax.random.randint(jax.random.key(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    out = {}
    for unroll in ("yes", "no"):
        train_cfg = config_lib.TrainConfig(steps=10, batch_size=4, unroll_layers=unroll)
        assert train_lib.unroll_layers(train_cfg, cfg, "tpu") == (unroll == "yes")
        fns = train_lib.make_train_functions(cfg, train_cfg)
        state = fns.init(jax.random.key(0))
        for _ in range(2):
            state, metrics = jax.jit(fns.train_step)(state, tokens)
        out[unroll] = (float(metrics["loss"]), state.params)
    np.testing.assert_allclose(out["yes"][0], out["no"][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(out["yes"][1]), jax.tree.leaves(out["no"][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    auto = config_lib.TrainConfig(steps=10, batch_size=4)
    assert train_lib.unroll_layers(auto, cfg, "cpu") and not train_lib.unroll_layers(
        auto, cfg, "tpu"
    )
    assert not train_lib.unroll_layers(auto, config_lib.get_preset("280b"), "cpu")
