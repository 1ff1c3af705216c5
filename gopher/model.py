"""The Gopher decoder-only Transformer in Haiku.

GPT-2 style pre-norm blocks with Gopher's two changes: RMSNorm instead of
LayerNorm, and Transformer-XL relative attention instead of absolute positions
(so the model runs on sequences longer than it was trained on). Input and output
embeddings are tied; all linear maps are bias-free, so the parameter count is
Gopher's 13 d^2 L + V d plus the norms' scales and the u, v biases.

Speed (XLA CPU; experiments/bench.py): attention (gopher/attention_xla.py), the MLP and
RMSNorm (gopher/layers.py) have hand-written backward passes, each tested against
autodiff of the plain formula. Left to autodiff, the 44m train step at seq 512,
batch 8 needed 6.5 GiB of scratch memory (now 2.6 GiB, over half of it the logits
and their gradient).

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

from gopher import cpu_kernels
from gopher.attention import AttentionLayout, RelativeAttention, attention_layout
from gopher.attention_xla import sinusoid_relative_encodings
from gopher.config import ModelConfig
from gopher.layers import Dense, mlp, rms_norm

# Remat policies by name; "none" means no rematerialisation at all.
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def _layout_and_blas(c: ModelConfig, attention: AttentionLayout | None, dtype):
    """How attention runs (`attention`, or the config's choice on the default backend, no
    mesh), and whether the matmuls, norms and gelu run beside its CPU kernel through the
    BLAS and C++ passes (cpu_kernels.blas_matmuls)."""
    layout = attention or attention_layout(c.attention, jax.default_backend())
    return layout, cpu_kernels.blas_matmuls(layout, dtype)


class Block(hk.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, config: ModelConfig, name: str | None = None, attention: AttentionLayout | None = None
    ):
        super().__init__(name=name)
        self.config = config
        self.attention = attention

    def __call__(
        self, x: jax.Array, rel_enc: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        c = self.config
        out_std = (
            c.init_scale / math.sqrt(2 * c.num_layers) if c.scale_residual_init else c.init_scale
        )
        layout, blas = _layout_and_blas(c, self.attention, x.dtype)
        h = rms_norm(x, c.rms_norm_eps, "attn_norm", blas)
        attn = RelativeAttention(c, out_std, name="attn", layout=layout)
        x = x + attn(h, rel_enc, mask)
        h = rms_norm(x, c.rms_norm_eps, "mlp_norm", blas)
        w_in = Dense(c.ffw_size, c.init_scale, name="mlp_in").weight(c.d_model)  # [D, F]
        w_out = Dense(c.d_model, out_std, name="mlp_out").weight(c.ffw_size)  # [F, D]
        return x + mlp(h, w_in.astype(h.dtype), w_out.astype(h.dtype), blas)  # [B, T, D]


class GopherLM(hk.Module):
    """Token ids [B, T] -> fp32 logits [B, T, V]."""

    def __init__(
        self,
        config: ModelConfig,
        compute_dtype=jnp.float32,
        remat: str = "none",
        activation_constraint: Callable[[jax.Array], jax.Array] | None = None,
        name: str = "lm",
        unroll: bool = False,
        attention: AttentionLayout | None = None,
    ):
        super().__init__(name=name)
        if remat not in REMAT_POLICIES:
            raise ValueError(
                f"unknown remat policy {remat!r}; choose one of {', '.join(REMAT_POLICIES)}"
            )
        self.config = config
        self.compute_dtype = compute_dtype
        self.remat = remat
        self.unroll = unroll  # the layer loop unrolled (faster on XLA CPU; compiles longer)
        self.constrain = activation_constraint or (lambda x: x)
        self.attention = attention  # None: config.attention on the default backend

    def embeddings(self) -> jax.Array:
        c = self.config
        return hk.get_parameter(
            "embeddings",
            [c.vocab_size, c.d_model],
            jnp.float32,
            init=hk.initializers.TruncatedNormal(c.init_scale),
        )

    def __call__(
        self, tokens: jax.Array, input_offset: jax.Array | None = None, hidden: bool = False
    ):
        """`input_offset` [B, T, D], if given, is added to the input embeddings: it lets
        tests and probes differentiate with respect to each input position. `hidden`:
        return (final normed hidden [B, T, D], embeddings [V, D]) instead of the logits,
        for the training loss, which fuses the output layer in (gopher/loss.py)."""
        c = self.config
        t = tokens.shape[1]
        # Looked up from an fp32 view: the lookup's gradient is a scatter-add over every
        # occurrence of a token, which on bf16 parameters summed (and rounded) in bf16 and
        # lost most of a frequent token's gradient (74% at 4096 occurrences).
        x = jnp.take(self.embeddings().astype(jnp.float32), tokens, axis=0)
        x = x.astype(self.compute_dtype)
        if input_offset is not None:
            x = x + input_offset.astype(x.dtype)
        x = self.constrain(x)  # [B, T, D]
        rel_enc = sinusoid_relative_encodings(t, c.d_model)  # [T, D]

        def layer(x):  # causal attention (no other mask)
            return self.constrain(Block(c, name="block", attention=self.attention)(x, rel_enc))

        if self.remat != "none":
            layer = hk.remat(layer, policy=REMAT_POLICIES[self.remat])
        unroll = c.num_layers if self.unroll else 1
        x = hk.layer_stack(c.num_layers, unroll=unroll, name="layers")(layer)(x)
        _, blas = _layout_and_blas(c, self.attention, x.dtype)
        h = rms_norm(x, c.rms_norm_eps, "final_norm", blas)  # [B, T, D]
        if hidden:
            return h, self.embeddings()
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
    hidden: bool = False,
    unroll: bool = False,
    attention: AttentionLayout | None = None,
) -> hk.Transformed:
    """A pure (init, apply) pair: apply(params, tokens [B, T]) -> logits [B, T, V]
    (with `hidden`, -> (h [B, T, D], embeddings [V, D]); the same parameters).
    `attention`: how attention runs (gopher.attention.attention_layout); default
    `config.attention` on the default backend, without a mesh."""

    def forward(tokens, input_offset=None):
        lm = GopherLM(
            config, compute_dtype, remat, activation_constraint, unroll=unroll, attention=attention
        )
        return lm(tokens, input_offset, hidden=hidden)

    return hk.without_apply_rng(hk.transform(forward))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats, fp32, without a one-hot.

    logits [B, T, V], targets [B, T] -> [B, T]
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit
