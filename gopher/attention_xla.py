"""The XLA implementation of Transformer-XL relative attention, with its custom VJPs.

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . (W_R R)_{i-j}] / sqrt(K)

Computed as Transformer-XL does: content scores (q+u) k^T plus position scores
(q+v) (W_R R)^T shifted so that column j holds distance i-j; the causal mask removes
what the shift leaves above the diagonal. `gopher.attention.attend` chooses between
this and the Pallas kernels (gopher/pallas_attention.py).

Layout: heads are their own, leading dimension, [H, B, T, K], everywhere inside attention.
With the batch split over the data axes and the heads over "model" (q, k, v and W_R
are column-parallel), every score, softmax and gradient stays on the rank that owns
its heads: the model axis splits attention's work instead of replicating it, and the
only model-axis collectives are the row-parallel output projection's (Megatron).

Speed (XLA CPU; experiments/bench.py): the attention runs one query chunk at a time,
skipping key blocks that the causal mask removes, and its backward pass recomputes
each chunk's scores from the saved log-sum-exp (as flash attention does) instead of
keeping [B, H, T, T] probabilities. On CPU the heads go a group at a time
(`grouped_relative_attention`) so that a chunk's scores stay in cache.

Shape glossary:
  B: batch size   T: sequence length (queries = keys, no memory)   H: heads
  K: key size     C: query chunk length   S: keys a query chunk sees (end of the chunk)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gopher.layers import sum_over_batch

# Queries per attention chunk: small enough that chunks skip most of the fully
# masked key blocks and keep [B, H, C, S] scores small, large enough that per-op
# overhead does not dominate (at T=512, 128 beat 96 and 256; 64 was within 3% and
# compiled more code, 0.04 GiB more peak RSS). Each chunk is
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
    """rel_shift for one query chunk, as a view: [..., C, S+1] -> [..., C, S].

    position[..., i, m] scores chunk query i against distance S-m (column 0 is a
    spare distance that only masked entries read). Query i sits at a = S-C+i, so its
    score against key j (distance a-j) is column j+C-i: in the flattened row-major
    buffer that is element C + i*S + j, a plain slice.
    """
    *lead, c, _ = position.shape
    flat = position.reshape(*lead, c * (s + 1))
    return flat[..., c : c + c * s].reshape(*lead, c, s)


def _unskew(ds: jax.Array) -> jax.Array:
    """The transpose of `_skew` on causal entries: [..., C, S] -> [..., C, S+1].

    Row i moves right by C-i. Padding each row with C zeros in front and viewing the
    flattened buffer with rows one longer shears row i by i; slicing keeps S+1 columns.
    """
    *lead, c, s = ds.shape
    width = s + c
    no_pad = [(0, 0)] * len(lead)
    sheared = jnp.pad(ds, no_pad + [(0, 0), (c, 0)])  # [..., C, S+C]
    flat = jnp.pad(sheared.reshape(*lead, c * width), no_pad + [(0, c)])
    return flat.reshape(*lead, c, width + 1)[..., : s + 1]


def _query_chunks(t: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, t)) for a in range(0, t, chunk)]


def _to_heads(x: jax.Array, h: int) -> jax.Array:
    """[B, T, H*K] -> [H, B, T, K]"""
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).transpose(2, 0, 1, 3)


def _from_heads(x: jax.Array) -> jax.Array:
    """[H, B, T, K] -> [B, T, H*K]"""
    h, b, t, kd = x.shape
    return x.transpose(1, 2, 0, 3).reshape(b, t, h * kd)


def _chunk_scores(qu, qv, k, r, mask, a: int, s: int) -> jax.Array:
    """fp32 scores of queries a..s-1 against keys 0..s-1, masked (causally, and by
    `mask` [T, T] unless it is None).  # [H, B, C, S]

    qu = q + u and qv = q + v_bias [H, B, T, K]; r [H, T+1, K] over distances T ... 0.
    The position term is one matmul per head over the whole batch's queries ([B*C, K]
    against the shared [K, S+1] table), not one per sequence.
    """
    t = k.shape[2]
    content = jnp.einsum(
        "hbik,hbjk->hbij", qu[:, :, a:s], k[:, :, :s], preferred_element_type=jnp.float32
    )  # [H, B, C, S]
    position = jnp.einsum(
        "hbik,hjk->hbij", qv[:, :, a:s], r[:, t - s :], preferred_element_type=jnp.float32
    )  # [H, B, C, S+1] against distances S ... 0
    scores = content + _skew(position, s)
    c = s - a
    causal = jax.lax.broadcasted_iota(jnp.int32, (c, s), 1) <= (
        jax.lax.broadcasted_iota(jnp.int32, (c, s), 0) + a
    )
    if mask is not None:  # a mask of its own, besides the causal one
        causal = causal & mask[a:s, :s]
    return jnp.where(causal, scores, _MASKED)


def _forward_heads(q, k, v, r, u, v_bias, mask, chunk):
    """The attention of q, k, v [H, B, T, K] (u, v_bias [H, 1, K] added to q here) ->
    output [H, B, T, K] and log-sum-exp [H, B, T]."""
    t = q.shape[2]
    qu, qv = q + u[:, None], q + v_bias[:, None]
    outs, lses = [], []
    for a, s in _query_chunks(t, chunk):
        scores = _chunk_scores(qu, qv, k, r, mask, a, s)
        m = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum(
            "hbij,hbjk->hbik", p.astype(v.dtype), v[:, :, :s], preferred_element_type=jnp.float32
        )
        outs.append((o / total).astype(v.dtype))  # [H, B, C, K]
        lses.append((m + jnp.log(total))[..., 0])  # [H, B, C]
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _delta(out: jax.Array, d_out: jax.Array, h: int) -> jax.Array:
    """sum over K of d_out * out per head, from [B, T, H*K] layouts -> [H, B, T] fp32."""
    b, t, d = out.shape
    prod = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).reshape(b, t, h, d // h)
    return jnp.sum(prod, axis=-1).transpose(2, 0, 1)


def _backward_heads(chunk, q, k, v, r, u, v_bias, mask, delta, lse, d_out):
    """Gradients of `_forward_heads` (all heads-major, as it takes and returns them):
    dq, dk, dv [H, B, T, K], d r [H, T+1, K], du, d v_bias [H, 1, K]. delta [H, B, T]
    is `_delta` of its output and d_out."""
    (h, b, t, kd), dt, f32 = q.shape, q.dtype, jnp.float32
    qu, qv = q + u[:, None], q + v_bias[:, None]

    def t_(x):  # [H, B, a, b] -> [H, B, b, a], materialized: XLA would fold a bare
        # transpose into the matmul as a contraction over a major dim, slower on CPU.
        return jax.lax.optimization_barrier(jnp.swapaxes(x, 2, 3))

    qu_t, do_t = t_(qu), t_(d_out)  # [H, B, K, T]
    qv_t = jax.lax.optimization_barrier(qv.transpose(0, 3, 1, 2))  # [H, K, B, T]
    # Key-side gradients accumulate transposed ([H, B, K, keys]), the fast matmul form;
    # the table's over the whole batch at once ([H, K, distances]).
    dk_t = jnp.zeros((h, b, kd, t), f32)
    dv_t = jnp.zeros((h, b, kd, t), f32)
    dr_t = jnp.zeros((h, kd, t + 1), f32)
    dq_content, dq_position = [], []
    for a, s in _query_chunks(t, chunk):
        k_s, v_s, r_s = k[:, :, :s], v[:, :, :s], r[:, t - s :]
        p = jnp.exp(_chunk_scores(qu, qv, k, r, mask, a, s) - lse[:, :, a:s, None])
        dv_t = dv_t.at[..., :s].add(
            jnp.einsum("hbki,hbij->hbkj", do_t[..., a:s], p.astype(dt), preferred_element_type=f32)
        )
        dp = jnp.einsum("hbik,hbjk->hbij", d_out[:, :, a:s], v_s, preferred_element_type=f32)
        ds = (p * (dp - delta[:, :, a:s, None])).astype(dt)  # d scores  [H, B, C, S]
        dq_content.append(jnp.einsum("hbij,hbjk->hbik", ds, k_s, preferred_element_type=f32))
        dk_t = dk_t.at[..., :s].add(
            jnp.einsum("hbki,hbij->hbkj", qu_t[..., a:s], ds, preferred_element_type=f32)
        )
        d_pos = _unskew(ds)  # [H, B, C, S+1]
        dq_position.append(jnp.einsum("hbij,hjk->hbik", d_pos, r_s, preferred_element_type=f32))
        # The table's gradient over the whole batch: [K, B*C] x [B*C, S+1] per head, both
        # operands row-major (XLA CPU's dot kernels take no bf16 with a transposed operand).
        c = s - a
        dr_t = dr_t.at[..., t - s :].add(
            jnp.einsum(
                "hkn,hnj->hkj",
                qv_t[..., a:s].reshape(h, kd, b * c),
                d_pos.reshape(h, b * c, s + 1),
                preferred_element_type=f32,
            )
        )
    dqc = jnp.concatenate(dq_content, axis=2)  # [H, B, T, K]
    dqp = jnp.concatenate(dq_position, axis=2)

    def per_head_sum(x):  # [H, B, T, K] -> [H, 1, K]
        return sum_over_batch(jnp.sum(x, axis=2).swapaxes(0, 1))[:, None, :]

    return (
        (dqc + dqp).astype(dt),
        # (the accumulators behind a barrier: with one query chunk XLA would fold the
        # swap into its matmul as a transposed operand, which XLA CPU's dot kernels take
        # in fp32 only: bf16 would fail to run)
        jnp.swapaxes(jax.lax.optimization_barrier(dk_t), 2, 3).astype(k.dtype),
        jnp.swapaxes(jax.lax.optimization_barrier(dv_t), 2, 3).astype(v.dtype),
        jnp.swapaxes(jax.lax.optimization_barrier(dr_t), 1, 2).astype(r.dtype),  # [H, T+1, K]
        per_head_sum(dqc).astype(u.dtype),
        per_head_sum(dqp).astype(v_bias.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def relative_attention(q, k, v, r, u, v_bias, mask, chunk):
    """softmax((q+u) k^T + skew((q+v_bias) r^T)) v, causal, one query chunk at a time.

    q (pre-scaled by 1/sqrt(K)), k, v: [B, T, H*K]; r: [H, T+1, K] projected
    encodings over distances T ... 0; u, v_bias: [H, 1, K] (pre-scaled); mask: [T, T]
    bool, or None for the causal mask alone. Returns [B, T, H*K]. Its residuals are its inputs and output in the layouts
    the projections around it keep anyway, plus the log-sum-exp [H, B, T]: the
    backward pass recomputes each chunk's scores instead of keeping probabilities.
    """
    return _relative_attention_fwd(q, k, v, r, u, v_bias, mask, chunk)[0]


def _relative_attention_fwd(q, k, v, r, u, v_bias, mask, chunk):
    h = r.shape[0]
    out, lse = _forward_heads(*(_to_heads(x, h) for x in (q, k, v)), r, u, v_bias, mask, chunk)
    out = _from_heads(out)
    return out, (q, k, v, r, u, v_bias, mask, out, lse)


def _relative_attention_bwd(chunk, residuals, d_out):
    q, k, v, r, u, v_bias, mask, out, lse = residuals
    h = r.shape[0]
    heads = (_to_heads(x, h) for x in (q, k, v))
    delta, do = _delta(out, d_out, h), _to_heads(d_out, h)
    dq, dk, dv, *rest = _backward_heads(chunk, *heads, r, u, v_bias, mask, delta, lse, do)
    return (*(_from_heads(x) for x in (dq, dk, dv)), *rest, None)


relative_attention.defvjp(_relative_attention_fwd, _relative_attention_bwd)


# XLA CPU: the heads are computed a group at a time (a loop), so that one query chunk's
# [B, heads, C, S] fp32 scores stay near this many bytes, in cache, through the dozen
# element-wise passes and small matmuls that read them. All heads at once, the nanoGPT
# shape (batch 8, 16 heads, seq 512) wrote 33 MB blocks per pass and its attention took
# about 270 ms per layer forward and backward; in groups of 2 heads (4 MB), 190 ms, and
# the step went from 536 to 588 tokens/s on 2 Xeon cores (README, Benchmarks).
CPU_SCORE_BLOCK_BYTES = 4 << 20


def heads_per_group(b: int, h: int, t: int, chunk: int, budget: int | None = None) -> int:
    """The most heads (a divisor of h) whose [b, heads, chunk, t] fp32 scores fit `budget`
    (default CPU_SCORE_BLOCK_BYTES)."""
    budget = budget or CPU_SCORE_BLOCK_BYTES
    fit = max(1, budget // (b * min(chunk, t) * t * 4))
    return max(d for d in range(1, h + 1) if h % d == 0 and d <= fit)


def grouped_relative_attention(qkv, r, u, v_bias, mask, chunk: int, group: int):
    """`relative_attention` over `group` heads at a time (a loop over H / group groups),
    from q, k and v packed as they leave their projection: qkv [B, T, 3, H*K].

    Same result as relative_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], ...); the
    loop bounds each chunk's live scores (CPU_SCORE_BLOCK_BYTES), and the gradient comes
    back packed too ([B, T, 3, H*K], one buffer that the projection's backward reads).
    """
    return _grouped_attention(qkv, r, u, v_bias, mask, chunk, group)


def _packed_to_heads(qkv, h: int) -> jax.Array:
    """[B, T, 3, H*K] -> [3, H, B, T, K]"""
    b, t, _, d = qkv.shape
    return qkv.reshape(b, t, 3, h, d // h).transpose(2, 3, 0, 1, 4)


def _rows(g, group: int, *xs):
    """Group g's heads of per-head arrays [H, ...]: one contiguous block of each."""
    return [jax.lax.dynamic_slice_in_dim(x, g * group, group, axis=0) for x in xs]


def _put_rows(g, group: int, xs, parts):
    """xs [H, ...] with group g's rows replaced by parts [group, ...]."""
    return [
        jax.lax.dynamic_update_slice_in_dim(x, p, g * group, axis=0)
        for x, p in zip(xs, parts, strict=True)
    ]


# The group loop sits inside one custom VJP. q, k and v are made heads-major ([H, B, T, K],
# one transposing pass each) before the loop, so that a group's heads are one contiguous
# block: inside the loop XLA fuses every slice and transpose into the op that reads it,
# and from the packed [B, T, 3, H*K] input each query chunk's transposed slices gathered
# elements 6 KB apart (the largest copy in the backward pass). They are the residuals
# too, in place of qkv, which nothing else keeps (the projection's backward reads x): the
# same memory, and no second transposing pass. The backward loop writes each group's
# gradients into heads-major arrays, transposed back once after it, whose initial values
# are computed from d_out: zeros (as lax.map's or lax.scan's stacked outputs are) XLA CPU
# allocates at the start of the step, live through the forward pass (0.2 to 0.4 GB at the
# nanoGPT shape). q, k and v come in packed, so their gradient is one array: as three
# slices of the projection's output, autodiff padded each gradient to the packed shape
# and added the three.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_attention(qkv, r, u, v_bias, mask, chunk, group):
    return _grouped_fwd(qkv, r, u, v_bias, mask, chunk, group)[0]


def _grouped_fwd(qkv, r, u, v_bias, mask, chunk, group):
    (b, t, _, _), (h, _, kd) = qkv.shape, r.shape
    q, k, v = _packed_to_heads(qkv, h)  # [H, B, T, K] each

    def body(g, carry):
        out, lse = carry
        o, o_lse = _forward_heads(*_rows(g, group, q, k, v, r, u, v_bias), mask, chunk)
        out = jax.lax.dynamic_update_slice_in_dim(out, _from_heads(o), g * group * kd, axis=2)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, o_lse, g * group, axis=0)

    # Written in place, as the [B, T, H*K] array that the output projection reads and the
    # backward pass keeps (so its zeros cost no memory of their own): built heads-major
    # and transposed after the loop, XLA CPU made two copies of it, one for each (8 MB a
    # layer at the nanoGPT shape).
    init = (jnp.zeros((b, t, h * kd), qkv.dtype), jnp.zeros((h, b, t), jnp.float32))
    out, lse = jax.lax.fori_loop(0, h // group, body, init)
    return out, (q, k, v, r, u, v_bias, mask, out, lse)


def _grouped_bwd(chunk, group, residuals, d_out):
    q, k, v, r, u, v_bias, mask, out, lse = residuals
    h = r.shape[0]
    delta, do = _delta(out, d_out, h), _to_heads(d_out, h)

    def body(g, grads):
        heads = _rows(g, group, q, k, v, r, u, v_bias, delta, lse, do)
        parts = _backward_heads(chunk, *heads[:6], mask, *heads[6:])
        return tuple(_put_rows(g, group, grads, parts))

    zero = do * 0
    init = (zero, zero, zero, jnp.zeros_like(r), jnp.zeros_like(u), jnp.zeros_like(v_bias))
    dq, dk, dv, dr, du, dvb = jax.lax.fori_loop(0, h // group, body, init)
    _, b, t, kd = q.shape
    d_qkv = jnp.stack([dq, dk, dv]).transpose(2, 3, 0, 1, 4).reshape(b, t, 3, h * kd)
    return d_qkv, dr, du, dvb, None


_grouped_attention.defvjp(_grouped_fwd, _grouped_bwd)
