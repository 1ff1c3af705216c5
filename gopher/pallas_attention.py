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

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_MASKED = float(jnp.finfo(jnp.float32).min)
F32 = jnp.float32


SKEWS = ("roll", "shift", "gather")
# "split": three backward kernels (dq; dk and dv; d r by diagonal), each recomputing the
# scores; "fused": one, with atomic adds (GPU; gopher/pallas_attention_fused.py).
BACKWARDS = ("split", "fused")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Static choices of the kernels.

    block: tile rows, for queries and keys alike (TPU: a multiple of 128 for speed,
        any multiple of 8 compiles; Triton: a power of two >= 16).
    skew: "roll" (TPU v5+, interpret), "shift" (TPU v4) or "gather" (GPU, Triton).
    interpret: run in Pallas interpret mode (CPU).
    warps: Triton's warps per program (GPU only).
    backward: "split" (three kernels, any platform) or "fused" (one, atomic adds: GPU and
        interpret mode; gopher/pallas_attention_fused.py).
    stages: Triton's software-pipelining depth (GPU only). 1, no pipelining, by default:
        on an H200 (jax 0.11.2) the backward kernels with 2 stages asked for more shared
        memory than the chip has at K = 128, and returned NaN gradients at K = 64 (the
        gather skew's scratch loads are loop-invariant, so the pipeliner may prefetch
        them ahead of the store they must follow).
    """

    block: int = 128
    skew: str = "roll"
    interpret: bool = False
    stages: int = 1
    backward: str = "split"
    warps: int = 4  # Triton num_warps (GPU only)

    def __post_init__(self):
        if self.skew not in SKEWS:
            raise ValueError(f"skew = {self.skew!r} is unknown; use one of {', '.join(SKEWS)}")
        if self.backward not in BACKWARDS:
            raise ValueError(
                f"backward = {self.backward!r} is unknown; use one of {', '.join(BACKWARDS)}"
            )
        if self.backward == "fused" and not (self.interpret or self.skew == "gather"):
            raise ValueError(
                "backward = 'fused' needs atomic adds: GPU (skew 'gather') or interpret mode; "
                "use backward='split' on TPU"
            )
        if self.block % 8:
            raise ValueError(f"block = {self.block} must be a multiple of 8 (TPU sublanes)")


def tpu_generation(device_kind: str) -> int | None:
    """5 for "TPU v5 lite", 7 for "TPU7x", None when the kind names no number."""
    found = re.search(r"(\d+)", device_kind)
    return int(found.group(1)) if found else None


# Mosaic (libtpu 0.0.42) compiles no bf16 matmul for TPU v3 and no strided rotation
# before v5 (both found by deviceless compiles).
MIN_TPU_GENERATION = 4


def options_for(
    platform: str,
    block: int | None = None,
    device_kind: str = "",
    stages: int | None = None,
    backward: str = "split",
    warps: int | None = None,
) -> KernelOptions:
    """The kernel's options on `platform` ("tpu", "gpu"/"cuda"/"rocm", or "cpu": interpret);
    on TPU `device_kind` ("TPU v4", "TPU v5 lite", ...) picks the skew."""
    if platform == "tpu":
        generation = tpu_generation(device_kind)
        if generation is not None and generation < MIN_TPU_GENERATION:
            raise ValueError(
                f"the Pallas attention needs TPU v{MIN_TPU_GENERATION} or later, not "
                f"{device_kind!r} (Mosaic compiles no bf16 matmul there); use "
                "--config.model.attention=xla"
            )
        strided = generation is not None and generation >= 5
        return KernelOptions(block or 128, "roll" if strided else "shift", False)
    if platform in ("gpu", "cuda", "rocm"):
        return KernelOptions(block or 64, "gather", False, stages or 1, backward, warps or 4)
    # interpret mode: small tiles, for tests
    return KernelOptions(block or 32, "roll", True, backward=backward)


# ------------------------------------------------------------------ tile arithmetic


def _dot_nt(a, b):
    """a [m, k] . b [n, k]^T -> [m, n] fp32"""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _dot_tn(a, b):
    """a [k, m]^T . b [k, n] -> [m, n] fp32"""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


class _Skew:
    """skew: [b, 2b] scores against the window -> [b, b] against the key tile
    (out[a, c] = x[a, b - a + c]); unskew: its transpose, [b, b] -> [b, 2b]
    (out[a, w] = x[a, w - b + a] where 0 <= w - b + a < b, else 0)."""

    def __init__(self, opts: KernelOptions, scratch=None):
        self.opts, self.scratch = opts, scratch

    def skew(self, x):
        b = x.shape[0]
        if self.opts.skew == "shift":
            return _rotate_rows(x, left=True)[:, :b]
        if self.opts.skew == "roll":
            from jax.experimental.pallas import tpu as pltpu

            # Row a rotates right by b + a (mod 2b), i.e. left by b - a.
            return pltpu.roll(x, b, 1, stride=1, stride_axis=0)[:, :b]
        rows, cols = _iotas(b, b)
        self._store(x)
        out = self.scratch[rows, b - rows + cols]
        self._barrier()
        return out

    def unskew(self, x):
        b = x.shape[0]
        if self.opts.skew == "shift":
            return _rotate_rows(jnp.concatenate([x, jnp.zeros_like(x)], axis=1), left=False)
        if self.opts.skew == "roll":
            from jax.experimental.pallas import tpu as pltpu

            # Row a must rotate right by b - a: a negative stride, which Mosaic's
            # rotation lacks. With the rows reversed (row a' = b-1-a) it is 1 + a'.
            padded = jnp.concatenate([x, jnp.zeros_like(x)], axis=1)  # [b, 2b]
            return _reverse_rows(pltpu.roll(_reverse_rows(padded), 1, 1, stride=1, stride_axis=0))
        rows, cols = _iotas(b, 2 * b)
        src = cols - b + rows
        self.scratch[:, :b] = x.astype(F32)
        self._barrier()
        out = self.scratch[rows, jnp.clip(src, 0, b - 1)]
        self._barrier()
        return jnp.where((src >= 0) & (src < b), out, 0.0).astype(x.dtype)

    def _store(self, x):
        self.scratch[...] = x.astype(F32)
        self._barrier()

    def _barrier(self):
        if not self.opts.interpret:
            from jax.experimental.pallas import triton as plgpu

            plgpu.debug_barrier()


def _rotate_rows(x, left: bool):
    """x [b, 2b] with row a rotated by b - a lanes (left or right), as a barrel shifter:
    for each bit of the shift, a rotation by that constant, kept where the row's shift has
    the bit."""
    from jax.experimental.pallas import tpu as pltpu

    b, width = x.shape[0], x.shape[1]
    shift = b - jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    for bit in range(b.bit_length()):
        step = 1 << bit
        rotated = pltpu.roll(x, width - step if left else step, 1)
        x = jnp.where((shift >> bit) & 1 == 1, rotated, x)
    return x


def _reverse_rows(x):
    """x [m, n] with its rows in reverse order (m a multiple of 8): eight-row groups in
    reverse order, each reversed by a gather inside its (8, 128) vector registers."""
    flip = 7 - jax.lax.broadcasted_iota(jnp.int32, (8, x.shape[1]), 0)
    groups = [
        jnp.take_along_axis(x[g : g + 8], flip, axis=0) for g in range(x.shape[0] - 8, -8, -8)
    ]
    return jnp.concatenate(groups, axis=0)


def _iotas(m, n):
    return (
        jax.lax.broadcasted_iota(jnp.int32, (m, n), 0),
        jax.lax.broadcasted_iota(jnp.int32, (m, n), 1),
    )


def _scores(qu, qv, kb, rw, qi, kj, skew: _Skew):
    """fp32 scores of query tile qi against key tile kj, causally masked.  # [b, b]

    rw [2b, K]: r rows (n - 1 - qi + kj) b ... (n + 1 - qi + kj) b, distances from
    (qi - kj + 1) b down to (qi - kj - 1) b + 1."""
    b = qu.shape[0]
    s = _dot_nt(qu, kb) + skew.skew(_dot_nt(qv, rw))
    rows, cols = _iotas(b, b)
    return jnp.where(cols + kj * b <= rows + qi * b, s, _MASKED)


def _window(r_ref, n, qi, kj, b):
    return r_ref[pl.ds(pl.multiple_of((n - 1 - qi + kj) * b, b), 2 * b), :]


def _tile(ref, i, b):
    return ref[pl.ds(pl.multiple_of(i * b, b), b), :]


# ---------------------------------------------------------------------- the kernels


def _forward_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, o_ref, lse_ref, *scratch, opts, n):
    b = opts.block
    qi = pl.program_id(2)
    skew = _Skew(opts, *scratch)
    qu, qv = qu_ref[...], qv_ref[...]

    def body(kj, carry):
        m, total, acc = carry
        vb = _tile(v_ref, kj, b)
        s = _scores(qu, qv, _tile(k_ref, kj, b), _window(r_ref, n, qi, kj, b), qi, kj, skew)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        total = alpha * total + jnp.sum(p, axis=1, keepdims=True)
        return m_new, total, alpha * acc + _dot(p.astype(vb.dtype), vb)

    init = (
        jnp.full((b, 1), _MASKED, F32),
        jnp.zeros((b, 1), F32),
        jnp.zeros((b, qu.shape[1]), F32),
    )
    m, total, acc = jax.lax.fori_loop(0, qi + 1, body, init)
    o_ref[...] = (acc / total).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)


def _grad_scores(qu, qv, do, lse, delta, kb, vb, rw, qi, kj, skew):
    """(p, ds) of one tile pair: probabilities and d scores, fp32 [b, b]."""
    p = jnp.exp(_scores(qu, qv, kb, rw, qi, kj, skew) - lse)
    return p, p * (_dot_nt(do, vb) - delta)


def _dq_kernel(qu_ref, qv_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, r_ref, *outs, opts, n):
    dqc_ref, dqp_ref, *scratch = outs
    b = opts.block
    qi = pl.program_id(2)
    skew = _Skew(opts, *scratch)
    qu, qv, do = qu_ref[...], qv_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(kj, carry):
        dqc, dqp = carry
        kb, rw = _tile(k_ref, kj, b), _window(r_ref, n, qi, kj, b)
        _, ds = _grad_scores(qu, qv, do, lse, delta, kb, _tile(v_ref, kj, b), rw, qi, kj, skew)
        # Rotations run on 32-bit data (Mosaic rotates no packed bf16 with a stride).
        d_pos = skew.unskew(ds).astype(kb.dtype)
        return dqc + _dot(ds.astype(kb.dtype), kb), dqp + _dot(d_pos, rw)

    zeros = jnp.zeros(qu.shape, F32)
    dqc, dqp = jax.lax.fori_loop(0, qi + 1, body, (zeros, zeros))
    dqc_ref[...] = dqc
    dqp_ref[...] = dqp


def _dkdv_kernel(k_ref, v_ref, qu_ref, qv_ref, do_ref, lse_ref, delta_ref, r_ref, *outs, opts, n):
    dk_ref, dv_ref, *scratch = outs
    b = opts.block
    kj = pl.program_id(2)
    skew = _Skew(opts, *scratch)
    kb, vb = k_ref[...], v_ref[...]

    def body(qi, carry):
        dk, dv = carry
        qu, do = _tile(qu_ref, qi, b), _tile(do_ref, qi, b)
        p, ds = _grad_scores(
            qu,
            _tile(qv_ref, qi, b),
            do,
            _tile(lse_ref, qi, b),
            _tile(delta_ref, qi, b),
            kb,
            vb,
            _window(r_ref, n, qi, kj, b),
            qi,
            kj,
            skew,
        )
        return dk + _dot_tn(ds.astype(qu.dtype), qu), dv + _dot_tn(p.astype(do.dtype), do)

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
    skew = _Skew(opts, *scratch)
    rw = _window(r_ref, n, d, 0, b)

    def body(kj, drw):
        qi = kj + d
        qv = _tile(qv_ref, qi, b)
        _, ds = _grad_scores(
            _tile(qu_ref, qi, b),
            qv,
            _tile(do_ref, qi, b),
            _tile(lse_ref, qi, b),
            _tile(delta_ref, qi, b),
            _tile(k_ref, kj, b),
            _tile(v_ref, kj, b),
            rw,
            qi,
            kj,
            skew,
        )
        return drw + _dot_tn(skew.unskew(ds).astype(qv.dtype), qv)

    drw_ref[...] = jax.lax.fori_loop(0, n - d, body, jnp.zeros(rw.shape, F32))


# ------------------------------------------------------------------- pallas_calls


def _tile_spec(b, k):  # [B, H, Tp, k] arrays, tile i of head h of row bi
    return pl.BlockSpec((None, None, b, k), lambda bi, h, i: (bi, h, i, 0))


def _single(opts):
    """Whole-sequence blocks change only with (batch row, head): on TPU one VMEM buffer
    each instead of two (T = 8192, K = 128 then fits the backward kernels in VMEM)."""
    if opts.interpret or opts.skew == "gather":
        return {}
    return {"pipeline_mode": pl.Buffered(1)}


def _whole_spec(tp, k, opts):  # [B, H, Tp, k] arrays, all of head h of row bi
    return pl.BlockSpec((None, None, tp, k), lambda bi, h, i: (bi, h, 0, 0), **_single(opts))


def _r_spec(rows, k, opts):  # r [H, Tp + b, K], all of head h
    return pl.BlockSpec((None, rows, k), lambda bi, h, i: (h, 0, 0), **_single(opts))


def _call(kernel, opts, grid, in_specs, out_specs, out_shape, *args):
    """pallas_call with the per-program scratch of the gather skew as an extra output."""
    b = opts.block
    gather = opts.skew == "gather"
    if gather:
        out_specs = [
            *out_specs,
            pl.BlockSpec((None, None, None, b, 2 * b), lambda bi, h, i: (bi, h, i, 0, 0)),
        ]
        out_shape = [*out_shape, jax.ShapeDtypeStruct((*grid, b, 2 * b), F32)]
    params = None
    if not opts.interpret:
        if gather:
            from jax.experimental.pallas import triton as plgpu

            params = plgpu.CompilerParams(num_warps=opts.warps, num_stages=opts.stages)
        else:
            from jax.experimental.pallas import tpu as pltpu

            params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=opts.interpret,
    )(*args)
    return outs[: len(outs) - gather]


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
    out, lse = _call(
        functools.partial(_forward_kernel, opts=opts, n=n),
        opts,
        (bsz, h, n),
        [_tile_spec(b, kd), _tile_spec(b, kd), _whole_spec(tp, kd, opts)]
        + [_whole_spec(tp, kd, opts), _r_spec(tp + b, kd, opts)],
        [_tile_spec(b, kd), _tile_spec(b, 1)],
        [jax.ShapeDtypeStruct(qu.shape, v.dtype), jax.ShapeDtypeStruct((bsz, h, tp, 1), F32)],
        qu,
        qv,
        k,
        v,
        r,
    )
    return out[:, :, :t], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def relative_attention_heads(q, k, v, r, u, v_bias, opts: KernelOptions = KernelOptions()):
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
    tile, whole, rs = _tile_spec(b, kd), _whole_spec(tp, kd, opts), _r_spec(tp + b, kd, opts)
    tile1, whole1 = _tile_spec(b, 1), _whole_spec(tp, 1, opts)
    f32_like = jax.ShapeDtypeStruct(qu.shape, F32)

    dqc, dqp = _call(
        functools.partial(_dq_kernel, opts=opts, n=n),
        opts,
        grid,
        [tile, tile, tile, tile1, tile1, whole, whole, rs],
        [tile, tile],
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
    dk, dv = _call(
        functools.partial(_dkdv_kernel, opts=opts, n=n),
        opts,
        grid,
        [tile, tile, whole, whole, whole, whole1, whole1, rs],
        [tile, tile],
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
    (drw,) = _call(
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
        from gopher.pallas_attention_fused import fused_backward

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


def relative_attention(q, k, v, r, u, v_bias, mask=None, chunk=None, *, opts=KernelOptions()):
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
