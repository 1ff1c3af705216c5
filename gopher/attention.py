"""Transformer-XL relative attention (Gopher's position scheme) with its custom VJP.

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . (W_R R)_{i-j}] / sqrt(K)

R is the fixed sinusoid table over distances and W_R a per-layer projection of it
(the 13th d^2 of each block). Computed as Transformer-XL does: content scores
(q+u) k^T plus position scores (q+v) (W_R R)^T shifted so that column j holds
distance i-j; the causal mask removes what the shift leaves above the diagonal.

Layout: heads are their own, leading dimension, [H, B, T, K], everywhere inside attention.
With the batch split over the data axes and the heads over "model" (q, k, v and W_R
are column-parallel), every score, softmax and gradient stays on the rank that owns
its heads: the model axis splits attention's work instead of replicating it, and the
only model-axis collectives are the row-parallel output projection's (Megatron).

Speed (XLA CPU; experiments/bench.py): the attention runs one query chunk at a time,
skipping key blocks that the causal mask removes, and its backward pass recomputes
each chunk's scores from the saved log-sum-exp (as flash attention does) instead of
keeping [B, H, T, T] probabilities.

Two implementations behind `attend`, chosen by `ModelConfig.attention` ("auto": the
Pallas kernels of gopher/pallas_attention.py on TPU and GPU, this XLA path on CPU):
the kernel cannot be split by XLA's partitioner, so under a mesh it runs inside
`shard_map`, batch over the data axes and heads over "model", as the XLA path is split.

Shape glossary:
  B: batch size   T: sequence length (queries = keys, no memory)   H: heads
  K: key size     C: query chunk length   S: keys a query chunk sees (end of the chunk)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gopher import pallas_attention
from gopher.config import ModelConfig
from gopher.layers import Dense, sum_over_batch

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


KERNEL_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")  # where "auto" picks the Pallas kernel


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """How `attend` computes: "xla" or "pallas" on `platform` (the kernel runs in
    interpret mode on "cpu"), and, with a `mesh`, the kernel's shard_map: the batch
    over `batch_axes`, heads over `head_axis`."""

    implementation: str = "xla"
    platform: str = "cpu"
    mesh: Any = None
    batch_axes: tuple[str, ...] = ()
    head_axis: str = "model"
    device_kind: str = ""  # e.g. "TPU v4": the kernel's skew depends on the TPU generation


def attention_layout(
    choice: str, platform: str, mesh: Any = None, batch_axes: tuple[str, ...] = ()
) -> AttentionLayout:
    """The layout for `ModelConfig.attention` = `choice` ("auto", "xla", "pallas") on
    devices of `platform` (the mesh's, else the first of the platform's devices); "auto"
    is the kernel on TPU v4+ and GPU, XLA elsewhere."""
    if mesh is not None:
        kind = mesh.devices.flat[0].device_kind
    else:
        try:
            kind = jax.devices(platform)[0].device_kind
        except RuntimeError:  # no such backend here (e.g. planning for another platform)
            kind = ""
    if choice == "auto":
        choice = "pallas" if platform in KERNEL_PLATFORMS else "xla"
        generation = pallas_attention.tpu_generation(kind) if platform == "tpu" else None
        if generation is not None and generation < pallas_attention.MIN_TPU_GENERATION:
            choice = "xla"  # TPU v2, v3: the kernel does not compile there
    return AttentionLayout(choice, platform, mesh, tuple(batch_axes), device_kind=kind)


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


def _on_each_device(fn, layout: AttentionLayout, qkv, r, u, v_bias) -> jax.Array:
    """fn(qkv, r, u, v_bias) on each device's own batch rows and heads (shard_map) when
    `layout` has a mesh that splits them; else fn on the whole arrays."""
    if layout.mesh is None:
        return fn(qkv, r, u, v_bias)
    sizes = dict(layout.mesh.shape)
    batch = tuple(a for a in layout.batch_axes if sizes.get(a, 1) > 1)
    heads = layout.head_axis if sizes.get(layout.head_axis, 1) > 1 else None
    # Axes that do not divide their dim are left out (that dim is replicated).
    if batch and qkv.shape[0] % math.prod(sizes[a] for a in batch):
        batch = ()
    if heads and r.shape[0] % sizes[heads]:
        heads = None
    if not batch and not heads:
        return fn(qkv, r, u, v_bias)
    per_head = P(heads, None, None)  # r [H, T+1, K], u and v_bias [H, 1, K]
    return jax.shard_map(
        fn,
        mesh=layout.mesh,
        in_specs=(P(batch or None, None, None, heads), per_head, per_head, per_head),
        out_specs=P(batch or None, None, heads),  # [B, T, H*K]
        check_vma=False,
    )(qkv, r, u, v_bias)


def attend(qkv, r, u, v_bias, mask, chunk: int, layout: AttentionLayout) -> jax.Array:
    """`relative_attention` (mask None: causal) by the implementation `layout` names, of
    q (pre-scaled), k and v packed as qkv [B, T, 3, H*K] -> [B, T, H*K].

    The kernel is causal only: with a `mask` it raises (use attention="xla")."""
    t = qkv.shape[1]
    if layout.implementation == "xla" and layout.platform == "cpu":

        def xla_cpu(qkv, r, u, v_bias):  # per device: its own batch rows and heads
            group = heads_per_group(qkv.shape[0], r.shape[0], t, chunk)
            return grouped_relative_attention(qkv, r, u, v_bias, mask, chunk, group)

        if mask is not None:  # a mask of its own (not sharded): the whole arrays
            return xla_cpu(qkv, r, u, v_bias)
        return _on_each_device(xla_cpu, layout, qkv, r, u, v_bias)
    if layout.implementation == "xla":
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return relative_attention(q, k, v, r, u, v_bias, mask, chunk)
    opts = pallas_attention.options_for(layout.platform, device_kind=layout.device_kind)

    def kernel(qkv, r, u, v_bias):
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return pallas_attention.relative_attention(q, k, v, r, u, v_bias, mask=mask, opts=opts)

    return _on_each_device(kernel, layout, qkv, r, u, v_bias)


class RelativeAttention(hk.Module):
    """Causal multi-head attention with Transformer-XL relative positions.

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . (W_R R_{i-j})] / sqrt(K)

    `mask` [T, T] is True where query i may attend to key j; it is combined with
    the causal mask (entries above the diagonal are never attended); None is the
    causal mask alone (the only one the Pallas kernel takes). `layout` chooses the
    implementation (default: `config.attention` on the default backend).
    """

    def __init__(
        self,
        config: ModelConfig,
        out_stddev: float,
        name: str | None = None,
        *,
        query_chunk: int = QUERY_CHUNK,
        layout: AttentionLayout | None = None,
    ):
        super().__init__(name=name)
        self.config = config
        self.out_stddev = out_stddev
        self.query_chunk = query_chunk
        self.layout = layout or attention_layout(config.attention, jax.default_backend())

    def __call__(
        self, x: jax.Array, rel_enc: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        c = self.config
        t = x.shape[1]
        h, k = c.num_heads, c.key_size
        dt = x.dtype
        scale = 1.0 / math.sqrt(k)
        # q, k and v in one matmul against their stacked weights [D, 3, H*K], the scores'
        # 1/sqrt(K) folded into W_q: the backward pass then sums the three input gradients
        # before the model axis's all-reduce (one all-reduce, not three). x @ W as it
        # comes, [B, T, 3, H*K]: as [3, B, T, H*K] XLA CPU transposed the product forward
        # and its gradient backward (24 MB a layer each way at the nanoGPT shape).
        w_qkv = jnp.stack(
            [
                Dense(h * k, c.init_scale, name=n).weight(x.shape[-1]) * s
                for n, s in (("q", scale), ("k", 1.0), ("v", 1.0))
            ],
            axis=1,
        ).astype(dt)
        qkv = jnp.einsum("btd,dch->btch", x, w_qkv)  # [B, T, 3, H*K]
        # W_R: the per-layer projection of the fixed sinusoids (the 13th d^2).
        r = Dense(h * k, c.init_scale, name="r")(rel_enc.astype(dt))  # [T, H*K]
        u_bias = hk.get_parameter("u_bias", [h, k], jnp.float32, init=jnp.zeros)
        v_bias = hk.get_parameter("v_bias", [h, k], jnp.float32, init=jnp.zeros)

        # A spare row in front (distance T, read only by masked entries) gives each
        # query chunk the S+1 distances that `_skew` slices from.
        r = jnp.pad(r.reshape(t, h, k), [(1, 0), (0, 0), (0, 0)]).transpose(1, 0, 2)
        out = attend(
            qkv,
            r,  # [H, T+1, K]
            (u_bias * scale).astype(dt)[:, None, :],  # [H, 1, K]
            (v_bias * scale).astype(dt)[:, None, :],
            mask,
            max(self.query_chunk, -(-t // MAX_QUERY_CHUNKS)),
            self.layout,
        )  # [B, T, H*K]
        return Dense(c.d_model, self.out_stddev, name="o")(out)
