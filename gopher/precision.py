"""Gopher's four precision settings (App. C) and stochastic rounding.

  fp32         fp32 parameters and activations.
  mixed        fp32 parameters, bf16 activations (Gopher's setting below 7.1B).
  bf16         bf16 parameters and activations, updates rounded to nearest.
  bf16_sr      bf16 parameters, updates stochastically rounded (7.1B and Gopher).
  bf16_master  bf16 parameters for compute, an fp32 master copy kept beside the
               (partitioned) optimiser state; the master is updated, then rounded.

The attention softmax and the loss's cross-entropy run in fp32 in every setting
(the model takes care of that).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: jnp.dtype
    compute_dtype: jnp.dtype
    stochastic_rounding: bool = False
    fp32_master: bool = False


POLICIES = {
    "fp32": Policy("fp32", jnp.float32, jnp.float32),
    "mixed": Policy("mixed", jnp.float32, jnp.bfloat16),
    "bf16": Policy("bf16", jnp.bfloat16, jnp.bfloat16),
    "bf16_sr": Policy("bf16_sr", jnp.bfloat16, jnp.bfloat16, stochastic_rounding=True),
    "bf16_master": Policy("bf16_master", jnp.bfloat16, jnp.bfloat16, fp32_master=True),
}


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown precision {name!r}; choose one of {', '.join(POLICIES)} "
            f"(--config.train.precision)"
        ) from None


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
    """fp32 -> bf16: to one of the two bf16 neighbours of `x`, the one away from zero
    with probability equal to the fraction of the gap between them that `x` has covered.

    Gopher App. C: bitcast to uint32, add uniform random bits in [0, 2^16), keep the
    top 16 bits, cast to bf16 (exact, since the low bits are then zero). The bits hold
    sign and magnitude, so the carry rounds the magnitude: away from zero, for negative
    values too. Unbiased: E[stochastic_round(x)] = x. Values exact in bf16 (zeros
    included) stay as they are; non-finite values, and any that would round up to
    infinity, are rounded to nearest instead.
    """
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, dtype=jnp.uint32) >> 16
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    y = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    # Non-finite inputs (and overflow into the exponent) keep plain rounding.
    y = jnp.where(jnp.isfinite(x) & jnp.isfinite(y), y, x)
    return y.astype(jnp.bfloat16)


def cast_params(params, policy: Policy):
    return jax.tree.map(lambda p: p.astype(policy.param_dtype), params)


def apply_updates(params, updates, policy: Policy, key: jax.Array):
    """params + fp32 updates, stored in the policy's parameter dtype.

    For fp32 params this is optax.apply_updates; for bf16 params the sum is formed
    in fp32 and rounded once (to nearest, or stochastically with per-leaf keys
    derived from `key`, which the train step derives from the step number).
    """
    leaves, treedef = jax.tree.flatten(params)
    upd = treedef.flatten_up_to(updates)
    if policy.stochastic_rounding and policy.param_dtype == jnp.bfloat16:
        keys = jax.random.split(key, len(leaves))
        out = [
            stochastic_round(p.astype(jnp.float32) + u.astype(jnp.float32), k)
            for p, u, k in zip(leaves, upd, keys, strict=True)
        ]
    else:
        out = [
            (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype)
            for p, u in zip(leaves, upd, strict=True)
        ]
    return jax.tree.unflatten(treedef, out)
