"""The Gopher decoder-only Transformer in Haiku.

GPT-2 style pre-norm blocks with Gopher's two changes: RMSNorm instead of
LayerNorm, and Transformer-XL relative attention instead of absolute positions
(so the model runs on sequences longer than it was trained on). Input and output
embeddings are tied; all linear maps are bias-free, so the parameter count is
Gopher's 13 d^2 L + V d plus the norms' scales and the u, v biases.

Shape glossary:
  B: batch size            T: sequence length (queries = keys, no memory)
  D: d_model               H: number of heads
  K: key size (H*K = D)    F: feed-forward size (4 D)
  V: vocabulary size       L: number of layers
"""

from __future__ import annotations

import math
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from gopher.config import ModelConfig

# Remat policies by name; "none" means no rematerialisation at all.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def sinusoid_relative_encodings(klen: int, dim: int) -> jax.Array:
    """Transformer-XL's fixed table R over distances klen-1 ... 0.  # [klen, dim]"""
    positions = jnp.arange(klen - 1, -1, -1, dtype=jnp.float32)
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions[:, None] * inv_freq[None, :]  # [klen, dim/2]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def rel_shift(x: jax.Array) -> jax.Array:
    """Turns scores against distances (T-1 ... 0) into scores against key positions.

    x[..., i, m] scores query i against distance T-1-m; the result's [..., i, j]
    scores query i against distance i-j for j <= i. Pad one zero column, view as
    [T+1, T], drop the first row, view back. Entries above the diagonal are garbage
    that the causal mask removes.
    """
    *lead, q, k = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., T, T+1]
    x = x.reshape(*lead, k + 1, q)[..., 1:, :]  # [..., T, T]
    return x.reshape(*lead, q, k)


class Dense(hk.Module):
    """A bias-free linear map whose weights are cast to the activations' dtype.

    Parameters are created in fp32 (the precision policy decides what is stored);
    the matmul runs in the dtype of the input.
    """

    def __init__(self, output_size: int, stddev: float, name: str | None = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.stddev = stddev

    def __call__(self, x: jax.Array) -> jax.Array:
        w = hk.get_parameter(
            "w",
            [x.shape[-1], self.output_size],
            jnp.float32,
            init=hk.initializers.TruncatedNormal(self.stddev),
        )
        return jnp.dot(x, w.astype(x.dtype))


def rms_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
    """RMSNorm computed in fp32 and returned in the input dtype."""
    y = hk.RMSNorm(axis=-1, eps=eps, name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


class RelativeAttention(hk.Module):
    """Causal multi-head attention with Transformer-XL relative positions.

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . (W_R R_{i-j})] / sqrt(K)
    """

    def __init__(self, config: ModelConfig, out_stddev: float, name: str | None = None):
        super().__init__(name=name)
        self.config = config
        self.out_stddev = out_stddev

    def __call__(self, x: jax.Array, rel_enc: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        h, k = c.num_heads, c.key_size
        q = Dense(h * k, c.init_scale, name="q")(x).reshape(b, t, h, k)  # [B, T, H, K]
        kk = Dense(h * k, c.init_scale, name="k")(x).reshape(b, t, h, k)
        v = Dense(h * k, c.init_scale, name="v")(x).reshape(b, t, h, k)
        # W_R: the per-layer projection of the fixed sinusoids (the 13th d^2).
        r = Dense(h * k, c.init_scale, name="r")(rel_enc.astype(x.dtype)).reshape(t, h, k)
        u_bias = hk.get_parameter("u_bias", [h, k], jnp.float32, init=jnp.zeros)
        v_bias = hk.get_parameter("v_bias", [h, k], jnp.float32, init=jnp.zeros)

        content = jnp.einsum(
            "bthk,bshk->bhts", q + u_bias.astype(x.dtype), kk, preferred_element_type=jnp.float32
        )  # [B, H, T, T]
        position = jnp.einsum(
            "bthk,shk->bhts", q + v_bias.astype(x.dtype), r, preferred_element_type=jnp.float32
        )  # [B, H, T, T] against distances T-1 ... 0
        scores = (content + rel_shift(position)) * (1.0 / math.sqrt(k))
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)  # fp32 softmax
        out = jnp.einsum("bhts,bshk->bthk", weights, v).reshape(b, t, h * k)
        return Dense(c.d_model, self.out_stddev, name="o")(out)


class Block(hk.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, name: str | None = None):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x: jax.Array, rel_enc: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        out_std = (
            c.init_scale / math.sqrt(2 * c.num_layers) if c.scale_residual_init else c.init_scale
        )
        h = rms_norm(x, c.rms_norm_eps, "attn_norm")
        x = x + RelativeAttention(c, out_std, name="attn")(h, rel_enc, mask)
        h = rms_norm(x, c.rms_norm_eps, "mlp_norm")
        h = Dense(c.ffw_size, c.init_scale, name="mlp_in")(h)  # [B, T, F]
        h = jax.nn.gelu(h)
        return x + Dense(c.d_model, out_std, name="mlp_out")(h)  # [B, T, D]


class GopherLM(hk.Module):
    """Token ids [B, T] -> fp32 logits [B, T, V]."""

    def __init__(
        self,
        config: ModelConfig,
        compute_dtype=jnp.float32,
        remat: str = "none",
        activation_constraint: Callable[[jax.Array], jax.Array] | None = None,
        name: str = "lm",
    ):
        super().__init__(name=name)
        if remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {remat!r}; choose one of {', '.join(REMAT_POLICIES)}"
            )
        self.config = config
        self.compute_dtype = compute_dtype
        self.remat = remat
        self.constrain = activation_constraint or (lambda x: x)

    def embeddings(self) -> jax.Array:
        c = self.config
        return hk.get_parameter(
            "embeddings",
            [c.vocab_size, c.d_model],
            jnp.float32,
            init=hk.initializers.TruncatedNormal(c.init_scale),
        )

    def __call__(self, tokens: jax.Array, input_offset: jax.Array | None = None) -> jax.Array:
        """`input_offset` [B, T, D], if given, is added to the input embeddings: it lets
        tests and probes differentiate with respect to each input position."""
        c = self.config
        t = tokens.shape[1]
        x = jnp.take(self.embeddings(), tokens, axis=0).astype(self.compute_dtype)
        if input_offset is not None:
            x = x + input_offset.astype(x.dtype)
        x = self.constrain(x)  # [B, T, D]
        rel_enc = sinusoid_relative_encodings(t, c.d_model)  # [T, D]
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))  # [T, T] causal

        def layer(x):
            return self.constrain(Block(c, name="block")(x, rel_enc, mask))

        if self.remat != "none":
            layer = hk.remat(layer, policy=REMAT_POLICIES[self.remat])
        x = hk.layer_stack(c.num_layers, name="layers")(layer)(x)
        h = rms_norm(x, c.rms_norm_eps, "final_norm")  # [B, T, D]
        # Tied output embedding; the logits (and so the loss's softmax) are fp32.
        return jnp.einsum(
            "btd,vd->btv",
            h,
            self.embeddings().astype(h.dtype),
            preferred_element_type=jnp.float32,
        )


def build_forward(
    config: ModelConfig,
    compute_dtype=jnp.float32,
    remat: str = "none",
    activation_constraint: Callable[[jax.Array], jax.Array] | None = None,
) -> hk.Transformed:
    """A pure (init, apply) pair: apply(params, tokens [B, T]) -> logits [B, T, V]."""

    def forward(tokens, input_offset=None):
        lm = GopherLM(config, compute_dtype, remat, activation_constraint)
        return lm(tokens, input_offset)

    return hk.without_apply_rng(hk.transform(forward))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats, fp32, without a one-hot.

    logits [B, T, V], targets [B, T] -> [B, T]
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit
