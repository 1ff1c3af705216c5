"""gopher/cpu_kernels.py, the fused C++ relative attention (XLA FFI) that "auto" runs on CPU:
its value and four gradients against the naive oracle (R_{i-j} built for every pair) and
the XLA path, with each BLAS; under a mesh; the whole model's loss and gradients against
the XLA path's; where it must hand over to XLA; its one-line refusals. And the BLAS matmul
beside it (the MLP's and the output layer's) against numpy and XLA's dots."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pallas_attention import _inputs, oracle  # tests/ is on sys.path

from gopher import attention, attention_xla, config, cpu_kernels, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _packed_inputs(b, h, t, kd, seed=0):
    """qkv [B, T, 3, H*K] packed as the projection leaves it, r, u, v_bias; and the
    cotangent [B, T, H*K]."""
    q, k, v, r, u, vb = _inputs(b, h, t, kd, seed=seed)
    qkv = jnp.stack([x.transpose(0, 2, 1, 3).reshape(b, t, h * kd) for x in (q, k, v)], axis=2)
    cot = jax.random.normal(jax.random.key(seed + 1), (b, t, h * kd))
    return (qkv, r, u, vb), cot


def _packed_oracle(qkv, r, u, vb):
    b, t, _, d = qkv.shape
    h = r.shape[0]
    heads = [qkv[:, :, i].reshape(b, t, h, d // h).transpose(0, 2, 1, 3) for i in range(3)]
    return oracle(*heads, r, u, vb).transpose(0, 2, 1, 3).reshape(b, t, d)


def _value_and_grads(fn, args, cot):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(cot))


# t=40 with chunks of 16: a ragged last chunk; t=64 one chunk; t=70 with the default 64.
@pytest.mark.parametrize("t,chunk", [(40, 16), (64, 64), (70, cpu_kernels.CHUNK)])
def test_value_and_four_gradients_match_the_oracle_and_the_xla_path(t, chunk):
    assert cpu_kernels.problem() is None
    b, h, kd = 2, 3, 8
    args, cot = _packed_inputs(b, h, t, kd, seed=t)
    got = _value_and_grads(jax.jit(lambda *a: cpu_kernels.relative_attention(*a, chunk)), args, cot)

    def xla_path(*a):
        return attention_xla.grouped_relative_attention(*a, None, 16, 1)

    for want in (
        _value_and_grads(_packed_oracle, args, cot),
        _value_and_grads(xla_path, args, cot),
    ):
        for name, g, w in zip(("out", "dqkv", "dr", "du", "dv_bias"), got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_with_numpys_openblas_too():
    """The same check in a process whose kernel calls numpy's OpenBLAS (ILP64), not MKL."""
    code = (
        "import numpy as np, jax\n"
        "from test_cpu_kernels import _packed_inputs, _packed_oracle, _value_and_grads\n"
        "from gopher import cpu_kernels\n"
        "assert cpu_kernels.blas() == 'openblas', cpu_kernels.blas()\n"
        "args, cot = _packed_inputs(2, 2, 37, 8)\n"
        "got = _value_and_grads(lambda *a: cpu_kernels.relative_attention(*a, 16), args, cot)\n"
        "for g, w in zip(got, _value_and_grads(_packed_oracle, args, cot)):\n"
        "    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, GOPHER_CPU_BLAS="openblas", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_auto_on_cpu_runs_the_kernel_and_hands_bf16_and_masks_to_xla():
    layout = attention.attention_layout("auto", "cpu")
    assert (layout.implementation, layout.fallback) == ("cpu", "xla")
    (qkv, r, u, vb), _ = _packed_inputs(2, 2, 24, 8)

    def hlo(qkv, r, u, vb, mask=None):
        fn = jax.jit(lambda *a: attention.attend(*a, mask, 16, layout))
        return fn.lower(qkv, r, u, vb).as_text()

    assert "GopherAttentionFwd" in hlo(qkv, r, u, vb)
    low = [x.astype(jnp.bfloat16) for x in (qkv, r, u, vb)]
    assert "GopherAttentionFwd" not in hlo(*low)
    mask = jnp.tril(jnp.ones((24, 24), bool), -1) | jnp.eye(24, dtype=bool)
    assert "GopherAttentionFwd" not in hlo(qkv, r, u, vb, mask=mask)
    # The same numbers either way.
    got = attention.attend(qkv, r, u, vb, None, 16, layout)
    want = attention_xla.grouped_relative_attention(qkv, r, u, vb, None, 16, 1)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_explicit_cpu_refuses_what_it_cannot_run_in_one_line():
    layout = attention.attention_layout("cpu", "cpu")
    (qkv, r, u, vb), _ = _packed_inputs(1, 2, 8, 4)
    low = [x.astype(jnp.bfloat16) for x in (qkv, r, u, vb)]
    with pytest.raises(ValueError, match=r"bfloat16 .*--config.model.attention=xla"):
        attention.attend(*low, None, 8, layout)
    with pytest.raises(ValueError, match=r"not tpu's.*attention=auto"):
        attention.attention_layout("cpu", "tpu")


def test_under_a_mesh_each_device_runs_its_own_rows_and_heads():
    """On a (2, 4) data x model mesh the kernel runs in shard_map, each device with 2 of the
    4 rows and 1 of the 4 heads; the result and gradients are the whole arrays'."""
    b, h, t, kd = 4, 4, 20, 8
    args, cot = _packed_inputs(b, h, t, kd)
    mesh = sharding.make_mesh(config.ParallelConfig(data=2, model=4))
    layout = attention.AttentionLayout("cpu", "cpu", mesh, sharding.BATCH_AXES)
    fn = jax.jit(lambda *a: attention.attend(*a, None, 8, layout))
    assert "shard_map" in str(jax.make_jaxpr(fn)(*args))
    got = _value_and_grads(fn, args, cot)
    for g, w in zip(got, _value_and_grads(_packed_oracle, args, cot), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_the_models_loss_and_gradients_equal_the_xla_paths():
    """The test preset's training loss (the whole model, attention auto: the kernel) and
    its gradient for every parameter, against attention="xla"."""
    from gopher import model, train

    cfg = config.get_preset("test")
    batch = jax.random.randint(jax.random.key(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    results = {}
    for choice in ("auto", "xla"):
        layout = attention.attention_layout(choice, "cpu")
        forward = model.build_forward(cfg, hidden=True, attention=layout)
        params = forward.init(jax.random.key(0), batch[:1, :8])
        results[choice] = jax.jit(jax.value_and_grad(train.mean_loss(forward)))(params, batch)
        assert (
            "GopherAttentionFwd" in jax.jit(train.mean_loss(forward)).lower(params, batch).as_text()
        ) == (choice == "auto")
    np.testing.assert_allclose(results["auto"][0], results["xla"][0], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
        results["auto"][1],
        results["xla"][1],
    )


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_against_numpy(ta, tb):
    rng = np.random.default_rng(0)
    for m, k, n in ((200, 37, 19), (5, 3, 7), (130, 64, 1)):  # split rows; one part; n = 1
        a = rng.standard_normal((k, m) if ta else (m, k), np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), np.float32)
        got = jax.jit(lambda a, b: cpu_kernels.matmul(a, b, ta, tb))(a, b)
        want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_matmul_adds_into_its_accumulator_in_a_scan():
    """add_to: c + op(a) @ op(b), as the loss sums its chunks' d E^T in a scan's carry."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 70, 130), np.float32)  # three chunks, transposed as the loss's
    b = rng.standard_normal((3, 70, 9), np.float32)
    c0 = rng.standard_normal((130, 9), np.float32)

    def run(a, b, c0):
        def body(c, ab):
            return cpu_kernels.matmul(ab[0], ab[1], ta=True, add_to=c), None

        return jax.lax.scan(body, c0, (a, b))[0]

    got = jax.jit(run)(a, b, c0)
    want = c0 + sum(a[i].T.astype(np.float64) @ b[i] for i in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for ta, tb in ((False, False), (False, True), (True, True)):
        x = rng.standard_normal((130, 70) if ta else (70, 130), np.float32)
        y = rng.standard_normal((9, 130) if tb else (130, 9), np.float32)
        c = rng.standard_normal((70, 9), np.float32)
        add = functools.partial(cpu_kernels.matmul, ta=ta, tb=tb)
        got = jax.jit(lambda x, y, c, add=add: add(x, y, add_to=c))(x, y, c)
        want = c + (x.T if ta else x).astype(np.float64) @ (y.T if tb else y)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_softmax_xent_against_numpy_in_float64():
    """Each row's NLL and (softmax - onehot) * scale, the rows split over the threads; large
    logits stay finite; a target outside [0, V) gives a NaN loss and no onehot."""
    rng = np.random.default_rng(2)
    n, v, scale = 37, 300, 0.125
    logits = (rng.standard_normal((n, v)) * 20).astype(np.float32)
    logits[3] += 1e4  # one row far from zero
    targets = rng.integers(0, v, n).astype(np.int32)
    targets[5], targets[6] = -1, v
    # the logits made inside the program, as the loss's matmul makes them (aliased buffer)
    g, nll = jax.jit(lambda x, t: cpu_kernels.softmax_xent(x * 1.0, t, scale))(logits, targets)
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    p = np.exp(x - top) / np.exp(x - top).sum(-1, keepdims=True)
    ok = (targets >= 0) & (targets < v)
    onehot = np.zeros_like(p)
    onehot[np.flatnonzero(ok), targets[ok]] = 1
    want_nll = (top[:, 0] + np.log(np.exp(x - top).sum(-1)))[ok] - x[ok, targets[ok]]
    np.testing.assert_allclose(g, (p - onehot) * scale, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(nll)[ok], want_nll, rtol=1e-5, atol=1e-4)
    assert np.isnan(np.asarray(nll)[~ok]).all()


def test_gelu_and_its_backward_against_float64():
    """gelu's tanh form and g * gelu'(pre), over the range where tanh saturates and where
    1 - exp(-2|u|) cancels, against its formula and central differences in float64."""
    pre = np.concatenate([np.linspace(-12, 12, 19994), [0.0, 1e-7, -1e-7, 50.0, -50.0, 3e-3]])
    pre = pre.astype(np.float32).reshape(-1, 8)
    g = np.random.default_rng(3).standard_normal(pre.shape).astype(np.float32)
    act = jax.jit(cpu_kernels.gelu)(pre)
    act_b, d_pre = jax.jit(lambda p, g: cpu_kernels.gelu_backward(p, g * 1.0))(pre, g)

    def gelu64(x):  # jax.nn.gelu's tanh form in float64
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x64 = pre.astype(np.float64)
    want = gelu64(x64)
    want_d = g * (gelu64(x64 + 1e-6) - gelu64(x64 - 1e-6)) / 2e-6  # central differences
    np.testing.assert_allclose(jax.nn.gelu(pre), want, rtol=1e-5, atol=1e-6)  # the same form
    for got in (act, act_b):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-7)
    np.testing.assert_allclose(d_pre, want_d, rtol=1e-5, atol=2e-7)


def test_mlp_projections_and_loss_through_the_blas_equal_xlas_dots():
    from gopher import layers, loss

    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (2, 9, 16))
    w_in, w_out = (
        0.2 * jax.random.normal(k, s) for k, s in ((keys[1], (16, 40)), (keys[2], (40, 16)))
    )
    emb = jax.random.normal(keys[3], (50, 16))
    targets = jax.random.randint(keys[4], (2, 9), 0, 50)
    cot = jax.random.normal(keys[4], x.shape)

    def both(blas):
        y, vjp = jax.vjp(lambda *a: layers.mlp(*a, blas), x, w_in, w_out)
        nll, grads = jax.value_and_grad(loss.lm_head_loss, argnums=(0, 1))(x, emb, targets, blas)
        z, linear_vjp = jax.vjp(lambda *a: layers.linear(*a, blas), x, w_in)  # [2, 9, 40]
        return (y, *vjp(cot), nll, *grads, z, *linear_vjp(jnp.tanh(z)))

    hlo = jax.jit(lambda: both(True)).lower().as_text()
    # the MLP's 2 and 4, the loss's 3, the projection's 1 and 2
    assert hlo.count("GopherMatmul") >= 2 + 4 + 3 + 1 + 2
    for got, want in zip(jax.jit(lambda: both(True))(), both(False), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_blas_matmuls_only_beside_the_kernel_on_one_device(monkeypatch):
    one = attention.attention_layout("auto", "cpu")
    assert cpu_kernels.blas_matmuls(one, jnp.float32)
    assert not cpu_kernels.blas_matmuls(one, jnp.bfloat16)
    assert not cpu_kernels.blas_matmuls(attention.attention_layout("xla", "cpu"), jnp.float32)
    mesh = sharding.make_mesh(config.ParallelConfig(data=4, model=2))
    assert not cpu_kernels.blas_matmuls(
        attention.AttentionLayout("cpu", "cpu", mesh, sharding.BATCH_AXES), jnp.float32
    )
    monkeypatch.setenv("GOPHER_CPU_MATMULS", "xla")
    assert not cpu_kernels.blas_matmuls(one, jnp.float32)


def _problem_in_a_process(env_extra: dict, tmp_path) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", GOPHER_KERNEL_CACHE=str(tmp_path), **env_extra)
    env["PYTHONPATH"] = ROOT
    code = "from gopher import cpu_kernels; print(cpu_kernels.problem())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_no_compiler_or_an_unknown_blas_is_one_line_and_attention_stays_on_xla(tmp_path):
    why = _problem_in_a_process({"CXX": "/bin/false"}, tmp_path / "a")
    assert why.startswith("compiling ") and "/bin/false" in why
    why = _problem_in_a_process({"GOPHER_CPU_BLAS": "atlas"}, tmp_path / "b")
    assert why == "GOPHER_CPU_BLAS='atlas' is unknown; use mkl, openblas or none"
    assert _problem_in_a_process({"GOPHER_CPU_BLAS": "none"}, tmp_path / "c").startswith(
        "turned off"
    )


def test_the_cpu_peak_counts_the_blas_matmul_too(monkeypatch):
    """MFU's CPU peak is the faster of XLA's dot and the BLAS the step's matmuls use (with
    XLA's alone, MKL's step printed an MFU over 100%): both are timed, on the same product."""
    from gopher import metrics

    calls = []
    real = cpu_kernels.matmul

    def counted(a, b, *args):
        calls.append(a.shape)
        return real(a, b, *args)

    monkeypatch.setattr(cpu_kernels, "matmul", counted)
    peak = metrics.measure_cpu_peak_flops(size=64, repeats=1)
    assert calls == [(64, 64)] and peak > 0  # traced once, then run
    monkeypatch.setenv("GOPHER_CPU_BLAS", "none")
    monkeypatch.setattr(cpu_kernels, "problem", lambda: "turned off")
    calls.clear()
    assert metrics.measure_cpu_peak_flops(size=64, repeats=1) > 0 and calls == []


@pytest.mark.parametrize("optimizer,decay", [("adam", 0.0), ("adamw", 0.1)])
@pytest.mark.parametrize("grad_scale", [1e-3, 30.0])  # under the clipping norm, and over it
def test_fused_adam_equals_optaxs_chain(optimizer, decay, grad_scale):
    """optim.fused_update (one C++ pass a parameter) against make_optimizer's optax chain and
    optax.apply_updates, over steps of the warm-up and the cosine: parameters, both moments,
    both counts, and the state's structure."""
    import optax

    from gopher import optim

    model_cfg = config.get_preset("test")
    train_cfg = config.TrainConfig(
        steps=6, warmup_steps=2, optimizer=optimizer, weight_decay=decay, max_lr=3e-2
    )
    keys = iter(jax.random.split(jax.random.key(3), 64))
    shapes = {"emb": (40, 8), "w": (3, 8, 24), "scale": (8,), "one": (1,)}
    params = {k: jax.random.normal(next(keys), s) for k, s in shapes.items()}
    reference = optim.make_optimizer(model_cfg, train_cfg)
    ref_state = fused_state = reference.init(params)
    ref_params = fused_params = params

    @jax.jit
    def ref_step(grads, state, p):
        updates, state = reference.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    fused = jax.jit(optim.fused_update(model_cfg, train_cfg))
    for _ in range(5):
        grads = {k: grad_scale * jax.random.normal(next(keys), s) for k, s in shapes.items()}
        ref_params, ref_state = ref_step(grads, ref_state, ref_params)
        norm = optax.tree.norm(grads)
        assert (norm > model_cfg.clip_norm) == (grad_scale > 1)
        fused_params, fused_state = fused(grads, norm, fused_state, fused_params)
    assert jax.tree.structure(fused_state) == jax.tree.structure(ref_state)
    for got, want in zip(jax.tree.leaves(fused_state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    jax.tree.map(
        lambda a, b, p: np.testing.assert_allclose(a - p, b - p, rtol=1e-5, atol=1e-6),
        fused_params,
        ref_params,
        params,
    )


def test_the_train_step_runs_adam_in_cpp_beside_the_kernel_and_skips_as_optax(monkeypatch):
    """The test preset's train step beside the kernel (attention auto) with the fused Adam,
    against the same step with optax's chain (optim.fused_update turned off), over three
    steps, the second poisoned with NaN (skipped: parameters and moments kept, the
    schedule's count advanced)."""
    from gopher import optim, train

    cfg = config.get_preset("test")
    train_cfg = config.TrainConfig(steps=10, warmup_steps=2, max_lr=1e-2, batch_size=4)
    batch = jax.random.randint(jax.random.key(1), (4, cfg.seq_len + 1), 0, cfg.vocab_size)
    states = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(optim, "fused_update", lambda *args: None)
        fns = train.make_train_functions(cfg, train_cfg, fault_steps=(2,))
        step = jax.jit(fns.train_step)
        state = fns.init(jax.random.key(0))
        assert ("GopherAdam" in step.lower(state, batch).as_text()) == fused
        for _ in range(3):
            state, _ = step(state, batch)
        states[fused] = state
    assert int(states[True].skipped) == int(states[False].skipped) == 1
    assert int(states[True].step) == 3
    assert jax.tree.structure(states[True]) == jax.tree.structure(states[False])
    for a, b in zip(jax.tree.leaves(states[True]), jax.tree.leaves(states[False]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rms_norm_and_its_backward_against_float64():
    """cpu_kernels.rms_norm and rms_norm_backward against the formula in float64 (rows of
    very different scales; a row count that splits unevenly over the threads), and through
    layers._rms_norm's VJP against autodiff of the plain formula."""
    from gopher import layers

    rng = np.random.default_rng(0)
    n, d, eps = 37, 24, 1e-6
    x = rng.normal(size=(n, d)) * np.exp(rng.uniform(-6, 6, size=(n, 1)))
    scale, dy = rng.normal(size=d), rng.normal(size=(n, d))
    inv = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    g = dy * scale
    want_dx = inv * g - inv**3 * (g * x).mean(-1, keepdims=True) * x
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, dy)]
    y, got_inv = jax.jit(cpu_kernels.rms_norm, static_argnums=2)(f32[0], f32[1], eps)
    np.testing.assert_allclose(y, x * scale * inv, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got_inv, inv[:, 0], rtol=2e-6)
    dx, d_scale = jax.jit(cpu_kernels.rms_norm_backward)(f32[0], f32[1], got_inv, f32[2])
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5 * np.abs(want_dx).max())
    np.testing.assert_allclose(d_scale, (dy * x * inv).sum(0), rtol=1e-5, atol=1e-5)

    def loss(x, scale, blas):
        return jnp.vdot(f32[2].reshape(n, 1, d), layers._rms_norm(x, scale, eps, blas))

    x3 = f32[0].reshape(n, 1, d)
    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x3, f32[1], True)
    want = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x3, f32[1], False)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
