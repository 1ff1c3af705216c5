"""The Gopher forward pass with a key/value cache, as pure functions over the Haiku params.

Sampling one token at a time with `GopherLM` would rerun the whole sequence per token.
Here each layer's keys and values are kept in a cache, and a call runs only the new
tokens (the padded prompt once, then one token per step) against everything cached.

Relative positions make the cache simple. The score of query i against key j is

    [(q_i + u) . k_j + (q_i + v) . (W_R R)_{i-j}] / sqrt(K)

and the position term depends on i - j alone: keys and values are cached as usual, and
`projected_encodings` computes W_R R over every distance 0 ... S-1 once per call, not
per step. Nothing is tied to the training seq_len, so decoding runs past it.

Ragged prompts are left-padded and their pad keys masked: distances between a row's
real tokens are those of the row alone, so each row gives what it gives alone.

The maths and dtypes are GopherLM's (gopher/model.py, gopher/attention.py): the same
params, the compute dtype's casts, fp32 RMSNorm, fp32 scores, softmax and logits.

Shape glossary:
  B: batch size      C: new tokens in this call (prompt length, or 1 per step)
  S: cache length (padded prompt + new tokens)     L: layers
  D: d_model   H: heads   K: key size   F: feed-forward size   V: vocabulary size
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gopher.attention_xla import sinusoid_relative_encodings
from gopher.config import ModelConfig
from gopher.layers import mlp

_MASKED = float(jnp.finfo(jnp.float32).min)  # as gopher/attention_xla.py masks scores
_BLOCK = "lm/layers/block/"


class Cache(NamedTuple):
    """Keys and values of every layer at every position written so far."""

    k: jax.Array  # [L, B, H, S, K]
    v: jax.Array  # [L, B, H, S, K]
    valid: jax.Array  # [B, S] bool: False at pad positions (never attended)


def _identity(x: jax.Array, kind: str) -> jax.Array:
    del kind
    return x


def mesh_constraint(mesh: Mesh | None, num_heads: int) -> Callable[[jax.Array, str], jax.Array]:
    """A `constrain(x, kind)` that pins activations to the training layout on `mesh`:
    rows over the batch axes, heads over "model" (when the heads divide over it)."""
    if mesh is None:
        return _identity
    from gopher.partition import axis_sizes
    from gopher.sharding import BATCH_AXES

    heads = "model" if num_heads % axis_sizes(mesh)["model"] == 0 else None
    specs = {
        "rows": P(BATCH_AXES),  # [B, ...]
        "cache": P(None, BATCH_AXES, heads),  # [L, B, H, S, K]
        "encodings": P(None, heads),  # [L, H, S, K]
        "replicated": P(),
    }

    def constrain(x: jax.Array, kind: str) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, specs[kind]))

    return constrain


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """gopher.layers.rms_norm without Haiku: fp32 maths, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * scale * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype)


def projected_encodings(params: Any, cfg: ModelConfig, length: int, dtype) -> jax.Array:
    """W_R R for every layer over distances 0 ... length-1.  # [L, H, S, K]

    The sinusoid at a distance does not depend on the table's length, so these are the
    rows the model's own table holds for the distances it has (and more beyond)."""
    rel = sinusoid_relative_encodings(length, cfg.d_model)[::-1].astype(dtype)  # [S, D]
    w_r = params[_BLOCK + "attn/r"]["w"].astype(dtype)  # [L, D, H*K]
    r = jnp.einsum("sd,ldh->lsh", rel, w_r)  # [L, S, H*K]
    r = r.reshape(cfg.num_layers, length, cfg.num_heads, cfg.key_size)
    return r.transpose(0, 2, 1, 3)


def init_cache(cfg: ModelConfig, valid: jax.Array, dtype) -> Cache:
    """An empty cache for rows whose positions are `valid` [B, S]."""
    b, s = valid.shape
    shape = (cfg.num_layers, b, cfg.num_heads, s, cfg.key_size)
    return Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), valid)


def _attend(qu, qv, k, v, rproj, positions, valid):
    """Softmax attention of C queries over S cached keys, relative positions.

    qu = (q + u) / sqrt(K), qv = (q + v) / sqrt(K): [B, H, C, K]; k, v: [B, H, S, K];
    rproj: [H, S, K] over distances 0 ... S-1; positions: [C] int32, each query's
    position in the cache; valid: [B, S]. Returns [B, H, C, K] in v's dtype.
    """
    s = k.shape[2]
    content = jnp.einsum("bhck,bhsk->bhcs", qu, k, preferred_element_type=jnp.float32)
    by_distance = jnp.einsum("bhck,hdk->bhcd", qv, rproj, preferred_element_type=jnp.float32)
    keys = jnp.arange(s, dtype=jnp.int32)
    distance = positions[:, None] - keys[None, :]  # [C, S]: i - j
    position = jnp.take_along_axis(
        by_distance, jnp.clip(distance, 0, s - 1)[None, None], axis=-1
    )  # [B, H, C, S]
    allowed = (distance >= 0)[None, None] & valid[:, None, None, :]
    scores = jnp.where(allowed, content + position, _MASKED)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhcs,bhsk->bhck", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / total).astype(v.dtype)


def prepare(params: Any, cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """The parameters as the decode loop reads them, cast and stacked once per call
    (not once per step): each layer's q, k, v weights stacked [L, D, 3, H*K] as the
    model stacks them, 1/sqrt(K) folded into W_q before the cast as the model folds it
    (in bf16, scaling q after the matmul rounds otherwise: greedy tokens then differed
    from the model's own at K=32), u and v scaled by 1/sqrt(K) [L, 1, H, 1, K]."""
    scale = 1.0 / math.sqrt(cfg.key_size)

    def w(name, factor=1.0):
        weight = params[_BLOCK + name]["w"]
        return (weight * factor if factor != 1.0 else weight).astype(dtype)

    def bias(name):
        return (params[_BLOCK + "attn"][name] * scale).astype(dtype)[:, None, :, None, :]

    return {
        "embeddings": params["lm"]["embeddings"],  # [V, D] looked up, then cast
        "output": params["lm"]["embeddings"].astype(dtype),  # [V, D] tied, cast once
        "final_norm": params["lm/final_norm"]["scale"],
        "layers": {
            "attn_norm": params[_BLOCK + "attn_norm"]["scale"],  # [L, D]
            "qkv": jnp.stack([w("attn/q", scale), w("attn/k"), w("attn/v")], axis=2),
            "u": bias("u_bias"),
            "v": bias("v_bias"),
            "o": w("attn/o"),  # [L, H*K, D]
            "mlp_norm": params[_BLOCK + "mlp_norm"]["scale"],
            "mlp_in": w("mlp_in"),  # [L, D, F]
            "mlp_out": w("mlp_out"),  # [L, F, D]
        },
    }


def forward(
    prepared: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    start: jax.Array | int,
    cache: Cache,
    rproj: jax.Array,
    constrain: Callable[[jax.Array, str], jax.Array] = _identity,
    last_only: bool = False,
) -> tuple[jax.Array, Cache]:
    """Runs tokens [B, C] at cache positions start ... start+C-1: fp32 logits [B, C, V]
    (`last_only`: of the last position alone, [B, 1, V]) and the cache with their keys
    and values written.

    `prepared` is `prepare(params, cfg, dtype)` and `rproj` `projected_encodings(params,
    cfg, S, dtype)`, both in the compute dtype. With `start` a Python int (the prompt's
    pass) queries see only the keys up to start+C; a traced `start` (the decode loop's)
    sees the whole cache, masked beyond the query."""
    h_, kd = cfg.num_heads, cfg.key_size
    b, c = tokens.shape
    dtype = prepared["output"].dtype
    x = jnp.take(prepared["embeddings"], tokens, axis=0).astype(dtype)
    x = constrain(x, "rows")  # [B, C, D]
    positions = start + jnp.arange(c, dtype=jnp.int32)  # [C]
    seen = start + c if isinstance(start, int) else cache.k.shape[3]
    valid = cache.valid[:, :seen]

    def heads(t):  # [B, C, H*K] -> [B, H, C, K]
        return t.reshape(b, c, h_, kd).transpose(0, 2, 1, 3)

    def layer(carry, xs):
        x, k_cache, v_cache = carry
        i, p, r = xs
        h = _rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        qkv = jnp.einsum("btd,dch->cbth", h, p["qkv"])  # [3, B, C, H*K]
        q, k_new, v_new = (heads(t) for t in qkv)  # [B, H, C, K]
        at = (i, 0, 0, start, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[None], at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[None], at)
        k_cache, v_cache = constrain(k_cache, "cache"), constrain(v_cache, "cache")
        k_l = jax.lax.dynamic_index_in_dim(k_cache, i, keepdims=False)[:, :, :seen]
        v_l = jax.lax.dynamic_index_in_dim(v_cache, i, keepdims=False)[:, :, :seen]
        o = _attend(q + p["u"], q + p["v"], k_l, v_l, r[:, :seen], positions, valid)
        o = o.transpose(0, 2, 1, 3).reshape(b, c, h_ * kd)  # [B, C, H*K]
        x = x + jnp.dot(o, p["o"])
        h = _rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
        x = constrain(x + mlp(h, p["mlp_in"], p["mlp_out"]), "rows")  # [B, C, D]
        return (x, k_cache, v_cache), None

    idx = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    xs = (idx, prepared["layers"], rproj)
    (x, k_cache, v_cache), _ = jax.lax.scan(layer, (x, cache.k, cache.v), xs)
    h = _rms_norm(x[:, -1:] if last_only else x, prepared["final_norm"], cfg.rms_norm_eps)
    logits = jnp.einsum("btd,vd->btv", h, prepared["output"], preferred_element_type=jnp.float32)
    return logits, Cache(k_cache, v_cache, cache.valid)
