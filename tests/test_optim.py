"""The update rule against a naive Adam written out here: clip by global norm, Adam with
bias correction, decoupled weight decay, then Gopher's warm-up + cosine LR (closed form)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopher import config, optim


def _lr(count, peak, warmup, steps, init=1e-7, final_ratio=0.1):
    """Gopher's LR at optax's `count` (the updates before this one), from the formulas."""
    if count < warmup:
        return init + (peak - init) * count / warmup
    end = peak * final_ratio
    frac = min(count - warmup, steps - warmup) / (steps - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def _naive_updates(params, grads_per_step, tc, peak, clip):
    """float64 numpy: the parameters after each step of clip -> Adam -> decay -> LR."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, grads in enumerate(grads_per_step, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        if norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        lr = _lr(t - 1, peak, tc.warmup_steps, tc.steps)
        for k in p:
            m[k] = tc.b1 * m[k] + (1 - tc.b1) * g[k]
            v[k] = tc.b2 * v[k] + (1 - tc.b2) * g[k] ** 2
            mhat, vhat = m[k] / (1 - tc.b1**t), v[k] / (1 - tc.b2**t)
            u = mhat / (np.sqrt(vhat) + tc.eps) + tc.weight_decay * p[k]
            p[k] = p[k] - lr * u
        out.append({k: x.copy() for k, x in p.items()})
    return out


@pytest.mark.parametrize("optimizer,weight_decay", [("adam", 0.0), ("adamw", 0.1)])
def test_update_rule_matches_a_naive_adam(optimizer, weight_decay):
    model = config.get_preset("test")
    tc = config.TrainConfig(
        steps=8, warmup_steps=3, max_lr=1e-2, clip_norm=0.5, optimizer=optimizer,
        weight_decay=weight_decay,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "s": np.ones(5, np.float32)}
    # Gradient norms around 0.1 .. 3: some steps are clipped, some are not.
    grads = [
        {k: (rng.normal(size=x.shape) * rng.choice([0.03, 1.0])).astype(np.float32)
         for k, x in params.items()}
        for _ in range(tc.steps)
    ]  # fmt: skip
    want = _naive_updates(params, grads, tc, peak=1e-2, clip=0.5)

    opt = optim.make_optimizer(model, tc)
    update = jax.jit(opt.update)
    state, p = opt.init(params), jax.tree.map(jnp.asarray, params)
    for t in range(tc.steps):
        u, state = update(jax.tree.map(jnp.asarray, grads[t]), state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
        for k in params:
            np.testing.assert_allclose(p[k], want[t][k], rtol=1e-6, atol=1e-7, err_msg=(t, k))
