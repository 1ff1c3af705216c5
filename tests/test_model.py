"""The model against independent oracles: naive relative attention, causality, ln(V)."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopher import attention, attention_xla, config, model


def naive_relative_attention(x, p, num_heads, key_size):
    """O(T^2) oracle: builds R_{i-j} for every pair (i, j) from the sinusoid formula."""
    x = np.asarray(x, np.float64)
    b, t, d = x.shape
    q = (x @ p["q"]["w"]).reshape(b, t, num_heads, key_size)
    k = (x @ p["k"]["w"]).reshape(b, t, num_heads, key_size)
    v = (x @ p["v"]["w"]).reshape(b, t, num_heads, key_size)
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    out = np.zeros((b, t, num_heads, key_size))
    for i in range(t):
        scores = np.full((b, num_heads, t), -np.inf)
        for j in range(i + 1):
            angles = (i - j) * inv_freq
            r_ij = np.concatenate([np.sin(angles), np.cos(angles)]) @ p["r"]["w"]
            r_ij = r_ij.reshape(num_heads, key_size)
            ac = np.einsum("bhk,bhk->bh", q[:, i] + p["u_bias"], k[:, j])
            bd = np.einsum("bhk,hk->bh", q[:, i] + p["v_bias"], r_ij)
            scores[:, :, j] = (ac + bd) / math.sqrt(key_size)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, i] = np.einsum("bhs,bshk->bhk", w, v)
    return out.reshape(b, t, d) @ p["o"]["w"]


def test_relative_attention_matches_naive_oracle():
    cfg = config.get_preset("test")
    t = 11

    def f(x):
        rel = attention_xla.sinusoid_relative_encodings(t, cfg.d_model)
        mask = jnp.tril(jnp.ones((t, t), bool))
        return attention.RelativeAttention(cfg, 0.02, name="attn")(x, rel, mask)

    fn = hk.without_apply_rng(hk.transform(f))
    x = jax.random.normal(jax.random.key(0), (2, t, cfg.d_model))
    params = fn.init(jax.random.key(1), x)
    # Non-zero u, v so both bias terms are exercised.
    params = jax.tree.map(lambda a: a, params)
    params["attn"]["u_bias"] = jax.random.normal(jax.random.key(2), (4, 16)) * 0.5
    params["attn"]["v_bias"] = jax.random.normal(jax.random.key(3), (4, 16)) * 0.5
    got = np.asarray(fn.apply(params, x))
    p = {k.split("/")[-1]: jax.tree.map(np.asarray, v) for k, v in params.items()}
    p.update(p.pop("attn"))
    want = naive_relative_attention(x, p, cfg.num_heads, cfg.key_size)
    assert np.max(np.abs(got - want)) < 1e-5


def test_rel_shift_against_index_formula():
    t = 7
    x = jnp.arange(t * t, dtype=jnp.float32).reshape(1, t, t)
    y = np.asarray(attention_xla.rel_shift(x))[0]
    for i in range(t):
        for j in range(i + 1):
            # column m of x holds distance t-1-m; we want distance i-j.
            assert y[i, j] == x[0, i, t - 1 - (i - j)]


def _lm(cfg, remat="none"):
    return model.build_forward(cfg, remat=remat)


@pytest.mark.slow  # make test-all; the suite's time budget
def test_causality_gradient_is_exactly_zero():
    cfg = config.get_preset("test")
    fwd = _lm(cfg)
    t = 16
    tokens = jax.random.randint(jax.random.key(0), (1, t), 0, cfg.vocab_size)
    params = fwd.init(jax.random.key(1), tokens)
    zero = jnp.zeros((1, t, cfg.d_model))
    for pos in (0, 5, 15):
        g = jax.grad(lambda off, p=pos: fwd.apply(params, tokens, off)[0, p].sum())(zero)
        g = np.asarray(g)[0]  # [T, D]: gradient with respect to each input position
        assert np.all(g[pos + 1 :] == 0.0), f"output {pos} depends on the future"
        assert np.any(g[: pos + 1] != 0.0)


def test_runs_on_twice_the_training_length():
    cfg = config.get_preset("test")
    fwd = _lm(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 2 * cfg.seq_len), 0, cfg.vocab_size)
    params = fwd.init(jax.random.key(1), tokens[:, :8])
    logits = fwd.apply(params, tokens)
    assert logits.shape == (2, 2 * cfg.seq_len, cfg.vocab_size)
    assert np.all(np.isfinite(np.asarray(logits)))
    # The prefix's outputs do not depend on how long the sequence is (no position table).
    short = fwd.apply(params, tokens[:, : cfg.seq_len])
    np.testing.assert_allclose(short, logits[:, : cfg.seq_len], atol=2e-5)


def test_initial_loss_is_near_ln_vocab():
    cfg = config.get_preset("test").replace(vocab_size=4096)
    fwd = _lm(cfg)
    tokens = jax.random.randint(jax.random.key(0), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    params = fwd.init(jax.random.key(1), tokens)
    loss = model.cross_entropy(fwd.apply(params, tokens[:, :-1]), tokens[:, 1:]).mean()
    assert abs(float(loss) - math.log(cfg.vocab_size)) / math.log(cfg.vocab_size) < 0.10


def test_cross_entropy_matches_log_softmax_oracle():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 11)) * 3
    targets = jnp.array([[0, 5, 10], [3, 3, 1]])
    want = -np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits)),
        np.asarray(targets)[..., None],
        -1,
    )[..., 0]
    np.testing.assert_allclose(model.cross_entropy(logits, targets), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", [pytest.param("full", marks=pytest.mark.slow), "dots_saveable"])
def test_remat_does_not_change_gradients(remat):
    cfg = config.get_preset("test")
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, cfg.vocab_size)
    base, rem = _lm(cfg), _lm(cfg, remat)
    params = base.init(jax.random.key(1), tokens)

    def loss(f):
        return lambda p: model.cross_entropy(f.apply(p, tokens[:, :-1]), tokens[:, 1:]).mean()

    g0 = jax.grad(loss(base))(params)
    g1 = jax.grad(loss(rem))(params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_param_count_matches_closed_form_for_every_table_preset():
    for name in config.TABLE_PRESETS:
        cfg = config.get_preset(name)
        fwd = _lm(cfg)
        shapes = jax.eval_shape(fwd.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
        formula = 13 * cfg.d_model**2 * cfg.num_layers + 32000 * cfg.d_model
        assert abs(n - formula) / formula < 1e-3, name


def _attention_fn(cfg, t, query_chunk):
    def f(x):
        rel = attention_xla.sinusoid_relative_encodings(t, cfg.d_model)
        mask = jnp.tril(jnp.ones((t, t), bool))
        attn = attention.RelativeAttention(cfg, 0.02, name="attn", query_chunk=query_chunk)
        return attn(x, rel, mask)

    return hk.without_apply_rng(hk.transform(f))


def _attention_params(fn, x):
    params = fn.init(jax.random.key(1), x)
    params["attn"]["u_bias"] = jax.random.normal(jax.random.key(2), (4, 16)) * 0.5
    params["attn"]["v_bias"] = jax.random.normal(jax.random.key(3), (4, 16)) * 0.5
    return params


def test_chunked_attention_matches_naive_oracle_across_chunks():
    # 11 queries in chunks of 4: three chunks, the last one short.
    cfg = config.get_preset("test")
    t = 11
    fn = _attention_fn(cfg, t, query_chunk=4)
    x = jax.random.normal(jax.random.key(0), (2, t, cfg.d_model))
    params = _attention_params(fn, x)
    got = np.asarray(fn.apply(params, x))
    p = {k.split("/")[-1]: jax.tree.map(np.asarray, v) for k, v in params.items()}
    p.update(p.pop("attn"))
    want = naive_relative_attention(x, p, cfg.num_heads, cfg.key_size)
    assert np.max(np.abs(got - want)) < 1e-5


def dense_relative_attention(x, p, num_heads, key_size):
    """Differentiable O(T^2)-memory reference: full scores, rel_shift, causal softmax."""
    b, t, d = x.shape
    q = (x @ p["q"]["w"]).reshape(b, t, num_heads, key_size)
    k = (x @ p["k"]["w"]).reshape(b, t, num_heads, key_size)
    v = (x @ p["v"]["w"]).reshape(b, t, num_heads, key_size)
    r = (attention_xla.sinusoid_relative_encodings(t, d) @ p["r"]["w"]).reshape(
        t, num_heads, key_size
    )
    content = jnp.einsum("bihk,bjhk->bhij", q + p["u_bias"], k)
    position = attention_xla.rel_shift(jnp.einsum("bihk,jhk->bhij", q + p["v_bias"], r))
    scores = (content + position) / math.sqrt(key_size)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhij,bjhk->bihk", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, t, d) @ p["o"]["w"]


def assert_gradients_match_dense_reference(fn, params, x, cfg):
    """Gradients of <fn(params, x), cot> in params and x equal autodiff of the dense
    reference's (rtol 1e-4, atol 1e-5), for a random cotangent."""
    cot = jax.random.normal(jax.random.key(4), x.shape)

    def ref(p, x):
        flat = {k.split("/")[-1]: v for k, v in p.items()}
        flat.update(flat.pop("attn"))
        return jnp.sum(dense_relative_attention(x, flat, cfg.num_heads, cfg.key_size) * cot)

    got = jax.grad(lambda p, x: jnp.sum(fn.apply(p, x) * cot), argnums=(0, 1))(params, x)
    want = jax.grad(ref, argnums=(0, 1))(params, x)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("query_chunk", [pytest.param(4, marks=pytest.mark.slow), 16])
def test_attention_gradients_match_autodiff_of_dense_reference(query_chunk):
    # The chunked attention has a hand-written backward pass; autodiff of the plain
    # formula is its oracle, for the input and for every parameter.
    cfg = config.get_preset("test")
    t = 13
    fn = _attention_fn(cfg, t, query_chunk)
    x = jax.random.normal(jax.random.key(0), (2, t, cfg.d_model))
    params = _attention_params(fn, x)
    assert_gradients_match_dense_reference(fn, params, x, cfg)


def assert_causal_attention_matches_the_oracles(cfg, t, layout):
    """RelativeAttention under `layout` (no mask of its own, query chunks of 4) against the
    naive oracle (forward) and autodiff of the dense reference (gradients)."""

    def f(x):
        rel = attention_xla.sinusoid_relative_encodings(t, cfg.d_model)
        return attention.RelativeAttention(cfg, 0.02, name="attn", query_chunk=4, layout=layout)(
            x, rel
        )

    fn = hk.without_apply_rng(hk.transform(f))
    x = jax.random.normal(jax.random.key(0), (2, t, cfg.d_model))
    params = _attention_params(fn, x)
    flat = {k.split("/")[-1]: jax.tree.map(np.asarray, v) for k, v in params.items()}
    flat.update(flat.pop("attn"))
    want = naive_relative_attention(x, flat, cfg.num_heads, cfg.key_size)
    assert np.max(np.abs(np.asarray(fn.apply(params, x)) - want)) < 1e-5
    assert_gradients_match_dense_reference(fn, params, x, cfg)


def test_accelerator_xla_path_matches_the_oracles():
    # TPU and GPU with attention="xla" take relative_attention on whole arrays, the causal
    # mask passed as None (no [T, T] array); the layout's platform is only a label here.
    cfg = config.get_preset("test")
    assert_causal_attention_matches_the_oracles(cfg, 13, attention.AttentionLayout("xla", "tpu"))


@pytest.mark.parametrize("budget,group", [(2 * 4 * 13 * 4, 1), (2 * 2 * 4 * 13 * 4, 2)])
def test_head_groups_match_the_oracles(monkeypatch, budget, group):
    # On XLA CPU the model's attention (no mask of its own) loops over groups of heads
    # sized by a cache budget; a small budget forces 1 and 2 heads per group of the 4.
    cfg = config.get_preset("test")
    t = 13
    monkeypatch.setattr(attention_xla, "CPU_SCORE_BLOCK_BYTES", budget)
    assert attention_xla.heads_per_group(2, cfg.num_heads, t, 4) == group
    assert_causal_attention_matches_the_oracles(cfg, t, attention.attention_layout("xla", "cpu"))


@pytest.mark.slow  # make test-all; the suite's time budget
def test_block_gradients_match_autodiff_of_plain_mlp_and_rms_norm():
    # RMSNorm and the MLP also have hand-written backward passes; compare a whole block
    # against the same maths written with jax.nn.gelu and hk.RMSNorm's formula.
    cfg = config.get_preset("test")
    t = 9

    def block(x):
        rel = attention_xla.sinusoid_relative_encodings(t, cfg.d_model)
        return model.Block(cfg, name="block")(x, rel, jnp.tril(jnp.ones((t, t), bool)))

    fn = hk.without_apply_rng(hk.transform(block))
    x = jax.random.normal(jax.random.key(0), (2, t, cfg.d_model))
    params = fn.init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), params)
    cot = jax.random.normal(jax.random.key(4), (2, t, cfg.d_model))

    def rms(x, scale):
        return x * scale * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6)

    def ref(p, x):
        a = {k.split("/")[-1]: v for k, v in p.items() if "/attn" in k}
        a.update(a.pop("attn"))
        h = rms(x, p["block/attn_norm"]["scale"])
        x = x + dense_relative_attention(h, a, cfg.num_heads, cfg.key_size)
        h = rms(x, p["block/mlp_norm"]["scale"])
        h = jax.nn.gelu(h @ p["block/mlp_in"]["w"]) @ p["block/mlp_out"]["w"]
        return jnp.sum((x + h) * cot)

    got = jax.grad(lambda p, x: jnp.sum(fn.apply(p, x) * cot), argnums=(0, 1))(params, x)
    want = jax.grad(ref, argnums=(0, 1))(params, x)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
