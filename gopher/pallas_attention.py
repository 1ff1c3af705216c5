"""Causal Transformer-XL relative attention as Pallas kernels, forward and backward.

    score(i, j) = (q_i + u) . k_j + (q_i + v) . (W_R R)_{i-j}     (q, u, v pre-scaled)

The same maths as `gopher.attention_xla.relative_attention`, fused: no [T, T] array ever
exists, in memory or in HBM. Queries and keys are cut into tiles of `block` rows. A
(query tile [i0, i0+b), key tile [j0, j0+b)) pair sees the distances i - j in
(i0-j0-b, i0-j0+b): a window of 2b consecutive rows of the projected table
r = W_R R, two aligned blocks of it. The kernel forms (q+v) r_window^T [b, 2b] with one
matmul and skews it, row a moving left by b - a, so that column c holds distance
(i0+a) - (j0+c): by index arithmetic inside the tile, never by a [T, T] shift.

  skew on TPU v5 and later (and in interpret mode): one strided lane rotation
      (`pltpu.roll` with a stride: row a rotates by b + a), Mosaic's `dynamic_rotate`;
  skew on TPU v4 (no strided rotation there): a barrel shifter, log2(2b) rotations by
      a constant, each kept by the rows whose shift has that bit (TPU v2 and v3 are not
      supported: Mosaic compiles no bf16 matmul there; "auto" takes the XLA path);
  skew on GPU (Triton): the [b, 2b] tile goes to a per-program scratch in global memory
      and comes back with a gather load (Triton has no in-register slicing or rotation).

Forward: grid (B, H, query tiles); each program walks the key tiles up to its own
(causal: later key tiles are never visited), with an fp32 online softmax, and writes
its output tile and the log-sum-exp. Backward (flash-attention style, scores
recomputed from the log-sum-exp): one kernel over query tiles for dq (content and
position parts apart: du and dv_bias are their sums), one over key tiles for dk and
dv, and one over tile diagonals (i0 - j0 fixed) for d r: every pair on a diagonal reads
and writes the same r window, so each diagonal's program owns its window's gradient;
the windows fold into d r [H, T+1, K] outside the kernel.
On GPU, `backward="fused"` replaces the three with one kernel over key tiles that adds dq
and the r windows' gradients atomically (gopher/pallas_attention_fused.py).

Causal only: the kernel has no mask argument (the model's mask is the causal one);
decoding with its cache and ragged prompts keeps the XLA path (gopher/decode.py).
T that is no multiple of the tile is padded with zero rows: padded keys are seen only
by padded queries, whose output gradient is zero. Keys, values and r sit whole in
each program's memory (VMEM on TPU, one buffer each): at K = 128 in bf16 the backward
kernels compile to T = 8192 for v5e, v5p and v6e, to T = 4096 for v4 (16 MiB of VMEM).

Shape glossary:
  B: batch   H: heads   T: sequence length   K: key size
  b: tile rows (block)   Tp: T padded up to a multiple of b   n: tiles (Tp / b)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gopher.pallas_attention_fused import fused_backward
from gopher.pallas_tiles import (  # noqa: F401  (the options, re-exported for callers)
    F32,
    MASKED,
    MIN_TPU_GENERATION,
    KernelOptions,
    Skew,
    backwards_for,
    call,
    dot,
    dot_tn,
    grad_scores,
    options_for,
    r_spec,
    scores,
    tile,
    tile_spec,
    tpu_generation,
    whole_spec,
    window,
)

DEFAULT_OPTIONS = KernelOptions()

# ---------------------------------------------------------------------- the kernels


def _forward_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, o_ref, lse_ref, *scratch, opts, n):
    b = opts.block
    qi = pl.program_id(2)
    skew = Skew(opts, *scratch)
    qu, qv = qu_ref[...], qv_ref[...]

    def body(kj, carry):
        m, total, acc = carry
        vb = tile(v_ref, kj, b)
        s = scores(qu, qv, tile(k_ref, kj, b), window(r_ref, n, qi, kj, b), qi, kj, skew)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        total = alpha * total + jnp.sum(p, axis=1, keepdims=True)
        return m_new, total, alpha * acc + dot(p.astype(vb.dtype), vb)

    init = (
        jnp.full((b, 1), MASKED, F32),
        jnp.zeros((b, 1), F32),
        jnp.zeros((b, qu.shape[1]), F32),
    )
    m, total, acc = jax.lax.fori_loop(0, qi + 1, body, init)
    o_ref[...] = (acc / total).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)


def _dq_kernel(qu_ref, qv_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, r_ref, *outs, opts, n):
    dqc_ref, dqp_ref, *scratch = outs
    b = opts.block
    qi = pl.program_id(2)
    skew = Skew(opts, *scratch)
    qu, qv, do = qu_ref[...], qv_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(kj, carry):
        dqc, dqp = carry
        kb, rw = tile(k_ref, kj, b), window(r_ref, n, qi, kj, b)
        _, ds = grad_scores(qu, qv, do, lse, delta, kb, tile(v_ref, kj, b), rw, qi, kj, skew)
        # Rotations run on 32-bit data (Mosaic rotates no packed bf16 with a stride).
        d_pos = skew.unskew(ds).astype(kb.dtype)
        return dqc + dot(ds.astype(kb.dtype), kb), dqp + dot(d_pos, rw)

    zeros = jnp.zeros(qu.shape, F32)
    dqc, dqp = jax.lax.fori_loop(0, qi + 1, body, (zeros, zeros))
    dqc_ref[...] = dqc
    dqp_ref[...] = dqp


def _dkdv_kernel(k_ref, v_ref, qu_ref, qv_ref, do_ref, lse_ref, delta_ref, r_ref, *outs, opts, n):
    dk_ref, dv_ref, *scratch = outs
    b = opts.block
    kj = pl.program_id(2)
    skew = Skew(opts, *scratch)
    kb, vb = k_ref[...], v_ref[...]

    def body(qi, carry):
        dk, dv = carry
        qu, do = tile(qu_ref, qi, b), tile(do_ref, qi, b)
        p, ds = grad_scores(
            qu,
            tile(qv_ref, qi, b),
            do,
            tile(lse_ref, qi, b),
            tile(delta_ref, qi, b),
            kb,
            vb,
            window(r_ref, n, qi, kj, b),
            qi,
            kj,
            skew,
        )
        return dk + dot_tn(ds.astype(qu.dtype), qu), dv + dot_tn(p.astype(do.dtype), do)

    zeros = jnp.zeros(kb.shape, F32)
    dk, dv = jax.lax.fori_loop(kj, n, body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dr_kernel(
    qu_ref, qv_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, r_ref, drw_ref, *scratch, opts, n
):
    """Diagonal d = qi - kj: every pair on it uses r rows (n-1-d) b ... (n+1-d) b."""
    b = opts.block
    d = pl.program_id(2)
    skew = Skew(opts, *scratch)
    rw = window(r_ref, n, d, 0, b)

    def body(kj, drw):
        qi = kj + d
        qv = tile(qv_ref, qi, b)
        _, ds = grad_scores(
            tile(qu_ref, qi, b),
            qv,
            tile(do_ref, qi, b),
            tile(lse_ref, qi, b),
            tile(delta_ref, qi, b),
            tile(k_ref, kj, b),
            tile(v_ref, kj, b),
            rw,
            qi,
            kj,
            skew,
        )
        return drw + dot_tn(skew.unskew(ds).astype(qv.dtype), qv)

    drw_ref[...] = jax.lax.fori_loop(0, n - d, body, jnp.zeros(rw.shape, F32))


# ------------------------------------------------------------------- pallas_calls


def _padded(q, k, v, r, u, v_bias, b):
    """qu, qv, k, v [B, H, Tp, K] (zero rows after T) and r [H, Tp + b, K] over
    distances Tp ... -(b-1) (zero rows where r has none)."""
    t = q.shape[2]
    tp = -(-t // b) * b
    pad = [(0, 0), (0, 0), (0, tp - t), (0, 0)]
    qu, qv, k, v = (jnp.pad(x, pad) for x in (q + u, q + v_bias, k, v))
    return qu, qv, k, v, jnp.pad(r, [(0, 0), (tp - t, b - 1), (0, 0)])


def _forward(q, k, v, r, u, v_bias, opts):
    (bsz, h, t, kd), b = q.shape, opts.block
    qu, qv, k, v, r = _padded(q, k, v, r, u, v_bias, b)
    tp = qu.shape[2]
    n = tp // b
    out, lse = call(
        functools.partial(_forward_kernel, opts=opts, n=n),
        opts,
        (bsz, h, n),
        [tile_spec(b, kd), tile_spec(b, kd), whole_spec(tp, kd, opts)]
        + [whole_spec(tp, kd, opts), r_spec(tp + b, kd, opts)],
        [tile_spec(b, kd), tile_spec(b, 1)],
        [jax.ShapeDtypeStruct(qu.shape, v.dtype), jax.ShapeDtypeStruct((bsz, h, tp, 1), F32)],
        qu,
        qv,
        k,
        v,
        r,
    )
    return out[:, :, :t], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def relative_attention_heads(q, k, v, r, u, v_bias, opts: KernelOptions = DEFAULT_OPTIONS):
    """Causal relative attention, heads apart: q (pre-scaled by 1/sqrt(K)), k, v
    [B, H, T, K]; r [H, T+1, K] over distances T ... 0; u, v_bias [H, 1, K]
    (pre-scaled). Returns [B, H, T, K] in v's dtype."""
    return _forward(q, k, v, r, u, v_bias, opts)[0]


def _fwd(q, k, v, r, u, v_bias, opts):
    out, lse = _forward(q, k, v, r, u, v_bias, opts)
    return out, (q, k, v, r, u, v_bias, out, lse)


def _split_backward(opts, qu, qv, k, v, r, do, lse, delta):
    """(dq, dk, dv, d r windows [B, H, n, 2b, K] by diagonal, du, dv_bias [H, 1, K]) of the
    padded arrays by three kernels."""
    bsz, h, tp, kd = qu.shape
    b = opts.block
    n = tp // b
    grid = (bsz, h, n)
    per_tile, whole, rs = tile_spec(b, kd), whole_spec(tp, kd, opts), r_spec(tp + b, kd, opts)
    per_tile1, whole1 = tile_spec(b, 1), whole_spec(tp, 1, opts)
    f32_like = jax.ShapeDtypeStruct(qu.shape, F32)

    dqc, dqp = call(
        functools.partial(_dq_kernel, opts=opts, n=n),
        opts,
        grid,
        [per_tile, per_tile, per_tile, per_tile1, per_tile1, whole, whole, rs],
        [per_tile, per_tile],
        [f32_like, f32_like],
        qu,
        qv,
        do,
        lse,
        delta,
        k,
        v,
        r,
    )
    dk, dv = call(
        functools.partial(_dkdv_kernel, opts=opts, n=n),
        opts,
        grid,
        [per_tile, per_tile, whole, whole, whole, whole1, whole1, rs],
        [per_tile, per_tile],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        k,
        v,
        qu,
        qv,
        do,
        lse,
        delta,
        r,
    )
    (drw,) = call(
        functools.partial(_dr_kernel, opts=opts, n=n),
        opts,
        grid,
        [whole, whole, whole, whole1, whole1, whole, whole, rs],
        [pl.BlockSpec((None, None, None, 2 * b, kd), lambda bi, hh, d: (bi, hh, d, 0, 0))],
        [jax.ShapeDtypeStruct((bsz, h, n, 2 * b, kd), F32)],
        qu,
        qv,
        do,
        lse,
        delta,
        k,
        v,
        r,
    )
    du = jnp.sum(dqc, axis=(0, 2))[:, None, :]
    dvb = jnp.sum(dqp, axis=(0, 2))[:, None, :]
    return dqc + dqp, dk, dv, drw, du, dvb


def _bwd(opts, residuals, d_out):
    q, k_in, v_in, r_in, u, v_bias, out, lse = residuals
    (_, h, t, kd), b = q.shape, opts.block
    qu, qv, k, v, r = _padded(q, k_in, v_in, r_in, u, v_bias, b)
    tp = qu.shape[2]
    n = tp // b
    pad = [(0, 0), (0, 0), (0, tp - t), (0, 0)]
    do = jnp.pad(d_out.astype(v.dtype), pad)
    delta = jnp.sum(do.astype(F32) * jnp.pad(out, pad).astype(F32), axis=-1, keepdims=True)
    if opts.backward == "fused":
        dq, dk, dv, drw, du, dvb = fused_backward(opts, qu, qv, k, v, r, do, lse, delta)
    else:
        dq, dk, dv, drw, du, dvb = _split_backward(opts, qu, qv, k, v, r, do, lse, delta)
    # Diagonal d's window is r blocks n-1-d (its first half) and n-d (its second half).
    drw = jnp.einsum("b...->...", drw).reshape(h, n, 2, b, kd)  # summed over the batch
    halves = drw[:, ::-1]  # diagonal n-1 first: block 0 first
    zero = jnp.zeros((h, 1, b, kd), F32)
    dr = jnp.concatenate([halves[:, :, 0], zero], 1) + jnp.concatenate([zero, halves[:, :, 1]], 1)
    dr = dr.reshape(h, (n + 1) * b, kd)[:, tp - t : tp + 1]  # [H, T+1, K]

    def unpad(x, like):
        return x[:, :, :t].astype(like.dtype)

    return (
        unpad(dq, q),
        unpad(dk, k_in),
        unpad(dv, v_in),
        dr.astype(r_in.dtype),
        du.astype(u.dtype),
        dvb.astype(v_bias.dtype),
    )


relative_attention_heads.defvjp(_fwd, _bwd)


def relative_attention(q, k, v, r, u, v_bias, mask=None, chunk=None, *, opts=DEFAULT_OPTIONS):
    """`gopher.attention_xla.relative_attention`'s signature and layout (q, k, v [B, T, H*K]
    -> [B, T, H*K]), causal only: `mask` must be None (the causal mask) and `chunk`
    is ignored (the kernel tiles by `opts.block`)."""
    del chunk
    if mask is not None:
        raise ValueError(
            "the Pallas relative attention is causal only: pass mask=None, or use "
            "--config.model.attention=xla for another mask"
        )
    h = r.shape[0]
    b, t, d = q.shape

    def heads(x):  # [B, T, H*K] -> [B, H, T, K]
        return x.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

    out = relative_attention_heads(heads(q), heads(k), heads(v), r, u, v_bias, opts)
    return out.transpose(0, 2, 1, 3).reshape(b, t, d)
