"""Gopher App. C's precision settings, checked against the definitions.

Stochastic rounding: each value lands on one of its two bf16 neighbours, the one away
from zero with probability equal to the fraction of the gap (so for negative values too).
One real training step (warm-up 0: the first update is at the peak LR, not at 1e-7, where
no bf16 parameter moves and a broken update path goes unseen): the update Adam computes,
re-derived here from its moments, reaches the parameters as each setting says: added in
fp32 (mixed), rounded to nearest (bf16), rounded stochastically (bf16_sr), or added to the
fp32 master, which is then rounded to nearest for the forward pass (bf16_master).
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from gopher import config, precision, train

BF16_GAP_AT_1 = 2.0**-7  # bf16 keeps 8 significant bits: 1.0 and 1.0078125 are neighbours


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("frac", [0.125, 0.5, 0.875])
def test_stochastic_round_goes_away_from_zero_with_the_fraction_of_the_gap(sign, frac):
    near, far = sign * 1.0, sign * (1.0 + BF16_GAP_AT_1)
    x = sign * (1.0 + frac * BF16_GAP_AT_1)  # exact in fp32
    n = 100_000
    out = precision.stochastic_round(jnp.full((n,), x, jnp.float32), jax.random.key(3))
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert set(np.unique(out).tolist()) <= {near, far}
    p_far = float(np.mean(out == far))
    assert abs(p_far - frac) < 5 * math.sqrt(frac * (1 - frac) / n), p_far
    assert abs(float(out.mean()) - x) < 5 * BF16_GAP_AT_1 / math.sqrt(n)  # unbiased


def test_stochastic_round_keeps_exact_values_signed_zeros_and_non_finite():
    x = np.array([0.0, -0.0, 1.0, -2.5, 2.0**-126, 3.3895314e38, np.inf, -np.inf, np.nan])
    x = x.astype(np.float32)  # each one exact in bf16 (3.3895314e38: bf16's largest)
    for seed in range(5):
        out = np.asarray(precision.stochastic_round(jnp.asarray(x), jax.random.key(seed)))
        out = out.astype(np.float32)
        np.testing.assert_array_equal(out, x)
        np.testing.assert_array_equal(np.signbit(out), np.signbit(x))


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return adam


def _f32(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


def _one_step(name: str, lr: float):
    """(state before, state after, metrics) of the test preset's first step at LR `lr`."""
    model = config.get_preset("test")
    tc = config.TrainConfig(steps=10, warmup_steps=0, max_lr=lr, precision=name)
    fns = train.make_train_functions(model, tc, precision=name)
    state = fns.init(jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (4, model.seq_len + 1), 0, model.vocab_size)
    new, metrics = jax.jit(fns.train_step)(state, batch)
    assert int(new.skipped) == 0
    assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6)  # warm-up 0: the peak at once
    return state, new, metrics


def _leaves(before, after, updates):
    """(before, after, update) per parameter, as fp32 / float64 numpy arrays."""
    return zip(_f32(before), _f32(after), updates, strict=True)


def _adam_first_update(new_state, lr: float) -> list[np.ndarray]:
    """Adam's first update from the moments it stored, in float64: mu = (1 - b1) g and
    nu = (1 - b2) g^2 for the clipped gradient g, so the update is -lr m / (sqrt(v) + eps)
    with the bias-corrected m = g, v = g^2."""
    tc = config.TrainConfig()  # _one_step's b1, b2 and eps
    adam = _adam_state(new_state.opt_state)
    assert int(adam.count) == 1
    out = []
    for mu, nu in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu), strict=True):
        m = np.asarray(mu, np.float64) / (1 - tc.b1)
        v = np.asarray(nu, np.float64) / (1 - tc.b2)
        out.append(-lr * m / (np.sqrt(v) + tc.eps))
    return out


def _bf16_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bf16 values either side of each fp32 `x` (toward zero, away from zero)."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    toward = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    away = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return toward, away


def _bf16_floor_ceil(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The largest bf16 value <= `x` and the smallest >= `x` (fp32 `x`)."""
    toward, away = _bf16_neighbours(x)
    exact = toward == x
    lo = np.where(exact, x, np.where(x > 0, toward, away))
    hi = np.where(exact, x, np.where(x > 0, away, toward))
    return lo, hi


def _fp32_sum_bounds(p0: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the train step's fp32 `p0 + u`: its update is ours up to fp32 rounding
    (a few parts in 1e7), which matters where `p0 + u` nearly cancels."""
    slack = 1e-6 * np.abs(u)
    return (p0 + u - slack).astype(np.float32), (p0 + u + slack).astype(np.float32)


def _nearest(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_mixed_adds_the_update_in_fp32():
    lr = 1e-3
    old, new, _ = _one_step("mixed", lr)
    for p0, p1, u in _leaves(old.params, new.params, _adam_first_update(new, lr)):
        low, high = _fp32_sum_bounds(p0, u)
        assert np.all((low <= p1) & (p1 <= high))


def test_bf16_rounds_the_fp32_sum_to_nearest():
    lr = 1e-3
    old, new, _ = _one_step("bf16", lr)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new.params))
    moved, loose = 0, 0
    for p0, p1, u in _leaves(old.params, new.params, _adam_first_update(new, lr)):
        low, high = _fp32_sum_bounds(p0, u)
        # Rounding to nearest is monotone: the result lies between the two bounds' roundings,
        # which agree for all but the few sums within float noise of a tie (or of zero).
        assert np.all((_nearest(low) <= p1) & (p1 <= _nearest(high)))
        loose += int((_nearest(low) != _nearest(high)).sum())
        moved += int((p1 != p0).sum())
    assert moved > 10_000 and loose < 100, (moved, loose)


def test_bf16_sr_rounds_the_fp32_sum_stochastically():
    """An LR well under most weights' bf16 gap: rounding to nearest would keep most of
    them; stochastic rounding moves each by the update on average."""
    lr = 3e-5
    old, new, _ = _one_step("bf16_sr", lr)
    along, size, n = 0.0, 0.0, 0
    for p0, p1, u in _leaves(old.params, new.params, _adam_first_update(new, lr)):
        low, high = _fp32_sum_bounds(p0, u)
        # One of the fp32 sum's two bf16 neighbours (never further).
        assert np.all((_bf16_floor_ceil(low)[0] <= p1) & (p1 <= _bf16_floor_ceil(high)[1]))
        np.testing.assert_array_equal(p1[u == 0], p0[u == 0])  # exact values stay
        if p0.ndim >= 2:  # the weight matrices: many values, small gaps
            along += float(((p1 - p0) * np.sign(u)).sum())
            size += float(np.abs(u).sum())
            n += p0.size
    assert n > 50_000
    assert along / size == pytest.approx(1.0, abs=0.05)  # E[p1 - p0] = u


def test_bf16_master_updates_the_fp32_copy_then_rounds_it_to_nearest():
    lr = 3e-5
    old, new, _ = _one_step("bf16_master", lr)
    updates = _adam_first_update(new, lr)
    for m0, m1, u in zip(_f32(old.master), _f32(new.master), updates, strict=True):
        low, high = _fp32_sum_bounds(m0, u)
        assert np.all((low <= m1) & (m1 <= high))
    for m1, p1 in zip(_f32(new.master), _f32(new.params), strict=True):
        np.testing.assert_array_equal(p1, _nearest(m1))
    # The master holds what the bf16 parameters lose: updates under half a gap.
    kept = sum(
        int(((m1 != m0) & (p1 == p0)).sum())
        for m0, m1, p0, p1 in zip(
            _f32(old.master), _f32(new.master), _f32(old.params), _f32(new.params), strict=True
        )
    )
    assert kept > 10_000
