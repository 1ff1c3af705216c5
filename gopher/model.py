"""The Gopher decoder-only Transformer in Haiku.

GPT-2 style pre-norm blocks with Gopher's two changes: RMSNorm instead of
LayerNorm, and Transformer-XL relative attention instead of absolute positions
(so the model runs on sequences longer than it was trained on). Input and output
embeddings are tied; all linear maps are bias-free, so the parameter count is
Gopher's 13 d^2 L + V d plus the norms' scales and the u, v biases.

Speed (XLA CPU; experiments/bench.py). Three pieces have hand-written backward
passes (jax.custom_vjp), each tested against autodiff of the plain formula:
- relative attention runs one query chunk at a time, skipping key blocks that the
  causal mask removes, and its backward pass recomputes each chunk's scores from the
  saved log-sum-exp (as flash attention does) instead of keeping [B, H, T, T] arrays;
- the MLP keeps its input and pre-activation and recomputes the gelu;
- RMSNorm keeps its input and the per-row inverse norm.
Left to autodiff, the 44m train step at seq 512, batch 8 needed 6.5 GiB of scratch
memory (now 2.6 GiB, over half of it the logits and their gradient); scratch memory
is fresh memory on every step, and its page faults, the residual traffic and a few
badly laid out fusions took most of the step time.

Shape glossary:
  B: batch size            T: sequence length (queries = keys, no memory)
  D: d_model               H: number of heads
  K: key size (H*K = D)    F: feed-forward size (4 D)
  V: vocabulary size       L: number of layers
  N: B*H (batch and heads, the batch dims of attention's matmuls)
  C: query chunk length    S: keys a query chunk sees (end of the chunk)
"""

from __future__ import annotations

import functools
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

# Queries per attention chunk: small enough that chunks skip most of the fully
# masked key blocks and keep [N, C, S] scores small, large enough that per-op
# overhead does not dominate (128 beat 64, 96 and 256 at T=512). Each chunk is
# unrolled into the graph, so long sequences use longer chunks to bound compile time.
QUERY_CHUNK = 128
MAX_QUERY_CHUNKS = 16

_MASKED = float(jnp.finfo(jnp.float32).min)


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
    that the causal mask removes. (The attention below does the same shift per query
    chunk with `_skew`, which needs no padded copy.)
    """
    *lead, q, k = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., T, T+1]
    x = x.reshape(*lead, k + 1, q)[..., 1:, :]  # [..., T, T]
    return x.reshape(*lead, q, k)


def _skew(position: jax.Array, s: int) -> jax.Array:
    """rel_shift for one query chunk, as a view: [N, C, S+1] -> [N, C, S].

    position[n, i, m] scores chunk query i against distance S-m (column 0 is a spare
    distance that only masked entries read). Query i sits at a = S-C+i, so its score
    against key j (distance a+i-j) is column j+C-i: in the flattened row-major buffer
    that is element C + i*S + j, a plain slice.
    """
    n, c, _ = position.shape
    return position.reshape(n, c * (s + 1))[:, c : c + c * s].reshape(n, c, s)


def _unskew(ds: jax.Array) -> jax.Array:
    """The transpose of `_skew` on causal entries: [N, C, S] -> [N, C, S+1].

    Row i moves right by C-i. Padding each row with C zeros in front and viewing the
    flattened buffer with rows one longer shears row i by i; slicing keeps S+1 columns.
    """
    n, c, s = ds.shape
    width = s + c
    sheared = jnp.pad(ds, [(0, 0), (0, 0), (c, 0)])  # [N, C, S+C]
    flat = jnp.pad(sheared.reshape(n, c * width), [(0, 0), (0, c)])
    return flat.reshape(n, c, width + 1)[:, :, : s + 1]


def _query_chunks(t: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, t)) for a in range(0, t, chunk)]


def _sum_over_batch(x: jax.Array) -> jax.Array:
    """x.sum(0) as a matmul with ones: XLA CPU's reduce over a major dim is ~50x slower."""
    ones = jnp.ones((x.shape[0],), x.dtype)
    return jnp.einsum("b,b...->...", ones, x, preferred_element_type=jnp.float32)


def _to_heads(x: jax.Array, h: int) -> jax.Array:
    """[B, T, H*K] -> [N, T, K]"""
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).transpose(0, 2, 1, 3).reshape(b * h, t, d // h)


def _from_heads(x: jax.Array, b: int) -> jax.Array:
    """[N, T, K] -> [B, T, H*K]"""
    n, t, kd = x.shape
    return x.reshape(b, n // b, t, kd).transpose(0, 2, 1, 3).reshape(b, t, n // b * kd)


def _prepare(q, k, v, r, u, v_bias):
    """Heads flattened into N = B*H; r, u, v_bias (per head) repeated for each n."""
    b, h = q.shape[0], r.shape[0]

    def per_batch(y):  # [H, ...] -> [N, ...]
        return jnp.broadcast_to(y, (b, *y.shape)).reshape(b * h, *y.shape[1:])

    q, k, v = (_to_heads(x, h) for x in (q, k, v))
    return q + per_batch(u), q + per_batch(v_bias), k, v, per_batch(r)


def _chunk_scores(qu, qv, k, r, mask, a: int, s: int) -> jax.Array:
    """fp32 scores of queries a..s-1 against keys 0..s-1, masked.  # [N, C, S]

    qu = q + u and qv = q + v_bias [N, T, K]; r [N, T+1, K] over distances T ... 0.
    """
    t = k.shape[1]
    content = jnp.einsum(
        "nik,njk->nij", qu[:, a:s], k[:, :s], preferred_element_type=jnp.float32
    )  # [N, C, S]
    position = jnp.einsum(
        "nik,njk->nij", qv[:, a:s], r[:, t - s :], preferred_element_type=jnp.float32
    )  # [N, C, S+1] against distances S ... 0
    scores = content + _skew(position, s)
    c = s - a
    causal = jax.lax.broadcasted_iota(jnp.int32, (c, s), 1) <= (
        jax.lax.broadcasted_iota(jnp.int32, (c, s), 0) + a
    )
    return jnp.where(causal & mask[a:s, :s], scores, _MASKED)


def _attention_forward(q, k, v, r, u, v_bias, mask, chunk):
    b, t, _ = q.shape
    qu, qv, k, v, r = _prepare(q, k, v, r, u, v_bias)
    outs, lses = [], []
    for a, s in _query_chunks(t, chunk):
        scores = _chunk_scores(qu, qv, k, r, mask, a, s)
        m = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum(
            "nij,njk->nik", p.astype(v.dtype), v[:, :s], preferred_element_type=jnp.float32
        )
        outs.append((o / total).astype(v.dtype))  # [N, C, K]
        lses.append((m + jnp.log(total))[..., 0])  # [N, C]
    return _from_heads(jnp.concatenate(outs, axis=1), b), jnp.concatenate(lses, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _relative_attention(q, k, v, r, u, v_bias, mask, chunk):
    """softmax((q+u) k^T + skew((q+v_bias) r^T)) v, causal, one query chunk at a time.

    q (pre-scaled by 1/sqrt(K)), k, v: [B, T, H*K]; r: [H, T+1, K] projected
    encodings over distances T ... 0; u, v_bias: [H, 1, K] (pre-scaled); mask: [T, T]
    bool. Returns [B, T, H*K]. Its residuals are its inputs and output in the layouts
    the projections around it keep anyway, plus the log-sum-exp [N, T]: the backward
    pass recomputes each chunk's scores instead of keeping [N, T, T] probabilities.
    """
    return _attention_forward(q, k, v, r, u, v_bias, mask, chunk)[0]


def _relative_attention_fwd(q, k, v, r, u, v_bias, mask, chunk):
    out, lse = _attention_forward(q, k, v, r, u, v_bias, mask, chunk)
    return out, (q, k, v, r, u, v_bias, mask, out, lse)


def _relative_attention_bwd(chunk, residuals, d_out):
    q_in, k_in, v_in, r_in, u_in, vb_in, mask, out, lse = residuals
    (b, t, _), (h, _, kd) = q_in.shape, r_in.shape
    dt, f32 = q_in.dtype, jnp.float32
    qu, qv, k, v, r = _prepare(q_in, k_in, v_in, r_in, u_in, vb_in)

    def t_(x):  # [N, a, b] -> [N, b, a], materialized: XLA would fold a bare transpose
        # into the matmul as a contraction over a major dim, a much slower form here.
        return jax.lax.optimization_barrier(jnp.swapaxes(x, 1, 2))

    out, d_out = _to_heads(out, h), _to_heads(d_out, h)
    delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # [N, T]
    qu_t, qv_t, do_t = t_(qu), t_(qv), t_(d_out)  # [N, K, T]
    # Key-side gradients accumulate transposed ([N, K, keys]), the fast matmul form.
    dk_t = jnp.zeros((b * h, kd, t), f32)
    dv_t = jnp.zeros((b * h, kd, t), f32)
    dr_t = jnp.zeros((b * h, kd, t + 1), f32)
    dq_content, dq_position = [], []
    for a, s in _query_chunks(t, chunk):
        k_s, v_s, r_s = k[:, :s], v[:, :s], r[:, t - s :]
        p = jnp.exp(_chunk_scores(qu, qv, k, r, mask, a, s) - lse[:, a:s, None])
        dv_t = dv_t.at[:, :, :s].add(
            jnp.einsum("nki,nij->nkj", do_t[:, :, a:s], p.astype(dt), preferred_element_type=f32)
        )
        dp = jnp.einsum("nik,njk->nij", d_out[:, a:s], v_s, preferred_element_type=f32)
        ds = (p * (dp - delta[:, a:s, None])).astype(dt)  # d scores  [N, C, S]
        dq_content.append(jnp.einsum("nij,njk->nik", ds, k_s, preferred_element_type=f32))
        dk_t = dk_t.at[:, :, :s].add(
            jnp.einsum("nki,nij->nkj", qu_t[:, :, a:s], ds, preferred_element_type=f32)
        )
        d_pos = _unskew(ds)  # [N, C, S+1]
        dq_position.append(jnp.einsum("nij,njk->nik", d_pos, r_s, preferred_element_type=f32))
        dr_t = dr_t.at[:, :, t - s :].add(
            jnp.einsum("nki,nij->nkj", qv_t[:, :, a:s], d_pos, preferred_element_type=f32)
        )
    dqc = jnp.concatenate(dq_content, axis=1)  # [N, T, K]
    dqp = jnp.concatenate(dq_position, axis=1)
    dr = jnp.swapaxes(_sum_over_batch(dr_t.reshape(b, h, kd, t + 1)), 1, 2)  # [H, T+1, K]
    return (
        _from_heads(dqc + dqp, b).astype(dt),
        _from_heads(jnp.swapaxes(dk_t, 1, 2), b).astype(k_in.dtype),
        _from_heads(jnp.swapaxes(dv_t, 1, 2), b).astype(v_in.dtype),
        dr.astype(r_in.dtype),
        _sum_over_batch(jnp.sum(dqc, axis=1).reshape(b, h, kd))[:, None, :].astype(u_in.dtype),
        _sum_over_batch(jnp.sum(dqp, axis=1).reshape(b, h, kd))[:, None, :].astype(vb_in.dtype),
        None,
    )


_relative_attention.defvjp(_relative_attention_fwd, _relative_attention_bwd)


@jax.custom_vjp
def _mlp(x: jax.Array, w_in: jax.Array, w_out: jax.Array) -> jax.Array:
    """gelu(x w_in) w_out  (gelu in its tanh form), [..., D] -> [..., D].

    The backward pass keeps only x and the pre-activation and recomputes the gelu;
    left to autodiff, XLA kept five [B, T, F] residuals per layer and wrote the
    gelu gradient transposed, which cost more than the MLP's matmuls.
    """
    return jnp.dot(jax.nn.gelu(jnp.dot(x, w_in)), w_out)


def _mlp_fwd(x, w_in, w_out):
    pre = jnp.dot(x, w_in)  # [..., F]
    return jnp.dot(jax.nn.gelu(pre), w_out), (x, pre, w_in, w_out)


def _mlp_bwd(residuals, dy):
    x, pre, w_in, w_out = residuals
    lead = x.shape[:-1]
    x, pre, dy = (a.reshape(-1, a.shape[-1]) for a in (x, pre, dy))  # [B*T, .]
    act, gelu_vjp = jax.vjp(jax.nn.gelu, pre)
    dw_out = jnp.einsum("nf,nd->fd", act, dy)
    (d_pre,) = gelu_vjp(jnp.einsum("nd,fd->nf", dy, w_out))
    dw_in = jnp.einsum("nd,nf->df", x, d_pre)
    dx = jnp.einsum("nf,df->nd", d_pre, w_in)
    return dx.reshape(*lead, -1), dw_in, dw_out


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


class Dense(hk.Module):
    """A bias-free linear map whose weights are cast to the activations' dtype.

    Parameters are created in fp32 (the precision policy decides what is stored);
    the matmul runs in the dtype of the input.
    """

    def __init__(self, output_size: int, stddev: float, name: str | None = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.stddev = stddev

    def weight(self, input_size: int) -> jax.Array:
        """The [input_size, output_size] parameter `w`."""
        return hk.get_parameter(
            "w",
            [input_size, self.output_size],
            jnp.float32,
            init=hk.initializers.TruncatedNormal(self.stddev),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.weight(x.shape[-1]).astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x * scale / sqrt(mean(x^2) + eps) over the last axis, as hk.RMSNorm computes it.

    The backward pass keeps x and the per-row inverse norm [..., 1]; autodiff kept
    six arrays the size of x (scale and inverse norm broadcast to it, products).
    """
    return x * scale * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _rms_norm_fwd(x, scale, eps):
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * scale * inv, (x, scale, inv)


def _rms_norm_bwd(eps, residuals, dy):
    del eps
    x, scale, inv = residuals
    g = dy * scale
    mean_gx = jnp.mean(g * x, axis=-1, keepdims=True)
    dx = inv * g - (inv**3 * mean_gx) * x
    d_scale = _sum_over_batch((dy * x * inv).reshape(-1, x.shape[-1]))
    return dx, d_scale.astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(hk.Module):
    """hk.RMSNorm's parameters (`scale` [D], ones) and maths, with `_rms_norm`'s backward."""

    def __init__(self, eps: float, name: str | None = None):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", x.shape[-1:], x.dtype, init=jnp.ones)
        return _rms_norm(x, scale, self.eps)


def rms_norm(x: jax.Array, eps: float, name: str) -> jax.Array:
    """RMSNorm computed in fp32 and returned in the input dtype."""
    y = RMSNorm(eps, name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


class RelativeAttention(hk.Module):
    """Causal multi-head attention with Transformer-XL relative positions.

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . (W_R R_{i-j})] / sqrt(K)

    `mask` [T, T] is True where query i may attend to key j; it is combined with
    the causal mask (entries above the diagonal are never attended).
    """

    def __init__(
        self,
        config: ModelConfig,
        out_stddev: float,
        name: str | None = None,
        *,
        query_chunk: int = QUERY_CHUNK,
    ):
        super().__init__(name=name)
        self.config = config
        self.out_stddev = out_stddev
        self.query_chunk = query_chunk

    def __call__(self, x: jax.Array, rel_enc: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        b, t, _ = x.shape
        h, k = c.num_heads, c.key_size
        dt = x.dtype
        scale = 1.0 / math.sqrt(k)
        q = Dense(h * k, c.init_scale, name="q")(x)  # [B, T, H*K]
        kk = Dense(h * k, c.init_scale, name="k")(x)
        v = Dense(h * k, c.init_scale, name="v")(x)
        # W_R: the per-layer projection of the fixed sinusoids (the 13th d^2).
        r = Dense(h * k, c.init_scale, name="r")(rel_enc.astype(dt))  # [T, H*K]
        u_bias = hk.get_parameter("u_bias", [h, k], jnp.float32, init=jnp.zeros)
        v_bias = hk.get_parameter("v_bias", [h, k], jnp.float32, init=jnp.zeros)

        # A spare row in front (distance T, read only by masked entries) gives each
        # query chunk the S+1 distances that `_skew` slices from.
        r = jnp.pad(r.reshape(t, h, k), [(1, 0), (0, 0), (0, 0)]).transpose(1, 0, 2)
        out = _relative_attention(
            q * scale,
            kk,
            v,
            r,  # [H, T+1, K]
            (u_bias * scale).astype(dt)[:, None, :],  # [H, 1, K]
            (v_bias * scale).astype(dt)[:, None, :],
            mask,
            max(self.query_chunk, -(-t // MAX_QUERY_CHUNKS)),
        )  # [B, T, H*K]
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
        w_in = Dense(c.ffw_size, c.init_scale, name="mlp_in").weight(c.d_model)  # [D, F]
        w_out = Dense(c.d_model, out_std, name="mlp_out").weight(c.ffw_size)  # [F, D]
        return x + _mlp(h, w_in.astype(h.dtype), w_out.astype(h.dtype))  # [B, T, D]


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
