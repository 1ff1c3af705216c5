"""The relative attention's backward pass as one Triton kernel (GPU), with atomic adds.

`gopher.pallas_attention`'s backward runs three kernels (dq; dk and dv; d W_R R per tile
diagonal), and each recomputes the scores with their skew. On an H200 they took 56% of
the 1.4b train step (README "On a GPU"). This one walks each key tile's query tiles once
(FlashAttention-2's order) and, per (query tile, key tile) pair, computes p and ds once:

    dk, dv        accumulate in registers (the program owns its key tile)
    dq            ds k + unskew(ds) r_window, added atomically to query tile qi (fp32)
    d r window    unskew(ds)^T (q+v), added atomically to diagonal qi - kj's window (fp32)
    du, dv_bias   column sums folded into per-program [1, K] partials, summed outside

Matmul work per pair: 11 tile-sized units against the three kernels' 19 (a unit is one
b x b x K product; the window's are 2b wide). The price is atomic traffic: 3 b K fp32 per
pair. Selected by `KernelOptions(backward="fused")` with the gather skew (GPU, or
interpret mode for the tests). Timed on an H200 it lost: attention alone at seq 2048
forward+backward 41.5 ms against the three kernels' 19.0, the 1.4b step at 12.9% MFU
against 23.1% (benchmarks/gpu_h200/run3_*): the atomic adds cost more than the
recomputation they save. It stays as a choice, not a default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gopher.pallas_tiles import (
    F32,
    KernelOptions,
    Skew,
    call,
    dot,
    dot_tn,
    grad_scores,
    r_spec,
    tile,
    tile_spec,
    whole_spec,
    window,
)


def _atomic_add(ref, idx, value, opts: KernelOptions):
    if opts.interpret:  # interpret mode runs the grid in order: a plain read-add-write
        ref[idx] = ref[idx] + value
        return
    from jax.experimental.pallas import triton as plgpu

    plgpu.atomic_add(ref, idx, value)


def _fused_kernel(
    k_ref,
    v_ref,
    qu_ref,
    qv_ref,
    do_ref,
    lse_ref,
    delta_ref,
    r_ref,
    _dq_init,
    _drw_init,
    dk_ref,
    dv_ref,
    dq_ref,
    drw_ref,
    du_ref,
    dvb_ref,
    *scratch,
    opts,
    n,
):
    b = opts.block
    kj = pl.program_id(2)
    skew = Skew(opts, *scratch)
    kb, vb = k_ref[...], v_ref[...]

    def body(qi, carry):
        dk, dv, col_ds, dvb = carry
        rows = pl.ds(pl.multiple_of(qi * b, b), b)
        qu, qv, do = tile(qu_ref, qi, b), tile(qv_ref, qi, b), tile(do_ref, qi, b)
        rw = window(r_ref, n, qi, kj, b)
        p, ds = grad_scores(
            qu, qv, do, tile(lse_ref, qi, b), tile(delta_ref, qi, b), kb, vb, rw, qi, kj, skew
        )
        d_pos = skew.unskew(ds).astype(kb.dtype)  # [b, 2b]
        ds_lo = ds.astype(kb.dtype)
        _atomic_add(dq_ref, (rows, slice(None)), dot(ds_lo, kb) + dot(d_pos, rw), opts)
        _atomic_add(drw_ref, (qi - kj, slice(None), slice(None)), dot_tn(d_pos, qv), opts)
        dvb = dvb + jnp.sum(jnp.sum(d_pos.astype(F32), axis=0)[:, None] * rw, 0, keepdims=True)
        return (
            dk + dot_tn(ds_lo, qu),
            dv + dot_tn(p.astype(do.dtype), do),
            col_ds + jnp.sum(ds, axis=0, keepdims=True),
            dvb,
        )

    zeros = jnp.zeros(kb.shape, F32)
    row = jnp.zeros((1, kb.shape[1]), F32)
    dk, dv, col_ds, dvb = jax.lax.fori_loop(
        kj, n, body, (zeros, zeros, jnp.zeros((1, b), F32), row)
    )
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    # du's share of this key tile: sum over its pairs of 1^T ds k = (column sums of ds) k.
    du_ref[...] = jnp.sum(col_ds.reshape(b, 1) * kb.astype(F32), axis=0, keepdims=True)
    dvb_ref[...] = dvb


def fused_backward(opts, qu, qv, k, v, r, do, lse, delta):
    """(dq, dk, dv, d r windows [B, H, n, 2b, K] by diagonal, du [H, 1, K], dv_bias [H, 1, K])
    of the padded arrays, as `gopher.pallas_attention._bwd`'s three kernels give them."""
    bsz, h, tp, kd = qu.shape
    b = opts.block
    n = tp // b
    per_tile, whole, rs = tile_spec(b, kd), whole_spec(tp, kd, opts), r_spec(tp + b, kd, opts)
    whole1 = whole_spec(tp, 1, opts)
    windows = pl.BlockSpec((None, None, n, 2 * b, kd), lambda bi, hh, i: (bi, hh, 0, 0, 0))
    part = pl.BlockSpec((None, None, None, 1, kd), lambda bi, hh, i: (bi, hh, i, 0, 0))
    out_specs = [per_tile, per_tile, whole, windows, part, part]
    out_shape = [
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct(qu.shape, F32),
        jax.ShapeDtypeStruct((bsz, h, n, 2 * b, kd), F32),
        jax.ShapeDtypeStruct((bsz, h, n, 1, kd), F32),
        jax.ShapeDtypeStruct((bsz, h, n, 1, kd), F32),
    ]
    dk, dv, dq, drw, du, dvb = call(
        functools.partial(_fused_kernel, opts=opts, n=n),
        opts,
        (bsz, h, n),
        [per_tile, per_tile, whole, whole, whole, whole1, whole1, rs, whole, windows],
        out_specs,
        out_shape,
        k,
        v,
        qu,
        qv,
        do,
        lse,
        delta,
        r,
        jnp.zeros(qu.shape, F32),
        jnp.zeros(out_shape[3].shape, F32),
        aliases={8: 2, 9: 3},  # dq and the windows start from zeros
    )
    du = jnp.sum(du, axis=(0, 2))  # [H, 1, K]
    dvb = jnp.sum(dvb, axis=(0, 2))
    return dq, dk, dv, drw, du, dvb
