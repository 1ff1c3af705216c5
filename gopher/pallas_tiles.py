"""What the Pallas relative-attention kernels share: their options, the tile arithmetic
(the matmul forms, the skew of the position scores on each platform, the masked scores
and their gradients), the BlockSpecs of the [B, H, Tp, K] arrays, and the pallas_call
with the gather skew's scratch. The kernels are in gopher/pallas_attention.py (forward,
and the three-kernel backward) and gopher/pallas_attention_fused.py (the one-kernel
backward for GPU); the algorithm and the shape glossary are in the first's docstring.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MASKED = float(jnp.finfo(jnp.float32).min)
F32 = jnp.float32

# ---------------------------------------------------------------------------- options

SKEWS = ("roll", "shift", "gather")
# "split": three backward kernels (dq; dk and dv; d r by diagonal), each recomputing the
# scores; "fused": one, with atomic adds (GPU; gopher/pallas_attention_fused.py).
BACKWARDS = ("split", "fused")


def backwards_for(platform: str) -> tuple[str, ...]:
    """The backwards the kernels have on `platform`: TPU kernels have no atomic adds."""
    return ("split",) if platform == "tpu" else BACKWARDS


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Static choices of the kernels.

    block: tile rows, for queries and keys alike (TPU: a multiple of 128 for speed,
        any multiple of 8 compiles; Triton: a power of two >= 16).
    skew: "roll" (TPU v5+, interpret), "shift" (TPU v4) or "gather" (GPU, Triton).
    interpret: run in Pallas interpret mode (CPU).
    stages: Triton's software-pipelining depth (GPU only). 1, no pipelining, by default:
        on an H200 (jax 0.11.2) the backward kernels with 2 stages asked for more shared
        memory than the chip has at K = 128, and returned NaN gradients at K = 64 (the
        gather skew's scratch loads are loop-invariant, so the pipeliner may prefetch
        them ahead of the store they must follow).
    backward: "split" (three kernels, any platform) or "fused" (one, atomic adds: GPU and
        interpret mode; gopher/pallas_attention_fused.py).
    warps: Triton's warps per program (GPU only).
    """

    block: int = 128
    skew: str = "roll"
    interpret: bool = False
    stages: int = 1
    backward: str = "split"
    warps: int = 4

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


# ---------------------------------------------------------------------- tile arithmetic


def dot_nt(a, b):
    """a [m, k] . b [n, k]^T -> [m, n] fp32"""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def dot_tn(a, b):
    """a [k, m]^T . b [k, n] -> [m, n] fp32"""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


class Skew:
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
        rows, cols = iotas(b, b)
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
        rows, cols = iotas(b, 2 * b)
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


def iotas(m, n):
    return (
        jax.lax.broadcasted_iota(jnp.int32, (m, n), 0),
        jax.lax.broadcasted_iota(jnp.int32, (m, n), 1),
    )


def scores(qu, qv, kb, rw, qi, kj, skew: Skew):
    """fp32 scores of query tile qi against key tile kj, causally masked.  # [b, b]

    rw [2b, K]: r rows (n - 1 - qi + kj) b ... (n + 1 - qi + kj) b, distances from
    (qi - kj + 1) b down to (qi - kj - 1) b + 1."""
    b = qu.shape[0]
    s = dot_nt(qu, kb) + skew.skew(dot_nt(qv, rw))
    rows, cols = iotas(b, b)
    return jnp.where(cols + kj * b <= rows + qi * b, s, MASKED)


def window(r_ref, n, qi, kj, b):
    return r_ref[pl.ds(pl.multiple_of((n - 1 - qi + kj) * b, b), 2 * b), :]


def tile(ref, i, b):
    return ref[pl.ds(pl.multiple_of(i * b, b), b), :]


def grad_scores(qu, qv, do, lse, delta, kb, vb, rw, qi, kj, skew):
    """(p, ds) of one tile pair: probabilities and d scores, fp32 [b, b]."""
    p = jnp.exp(scores(qu, qv, kb, rw, qi, kj, skew) - lse)
    return p, p * (dot_nt(do, vb) - delta)


# --------------------------------------------------------------- specs and pallas_call


def tile_spec(b, k):  # [B, H, Tp, k] arrays, tile i of head h of row bi
    return pl.BlockSpec((None, None, b, k), lambda bi, h, i: (bi, h, i, 0))


def _single(opts):
    """Whole-sequence blocks change only with (batch row, head): on TPU one VMEM buffer
    each instead of two (T = 8192, K = 128 then fits the backward kernels in VMEM)."""
    if opts.interpret or opts.skew == "gather":
        return {}
    return {"pipeline_mode": pl.Buffered(1)}


def whole_spec(tp, k, opts):  # [B, H, Tp, k] arrays, all of head h of row bi
    return pl.BlockSpec((None, None, tp, k), lambda bi, h, i: (bi, h, 0, 0), **_single(opts))


def r_spec(rows, k, opts):  # r [H, Tp + b, K], all of head h
    return pl.BlockSpec((None, rows, k), lambda bi, h, i: (h, 0, 0), **_single(opts))


def call(kernel, opts, grid, in_specs, out_specs, out_shape, *args, aliases=None):
    """pallas_call with the per-program scratch of the gather skew as an extra output;
    `aliases` {input index: output index} are outputs that start from those inputs."""
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
        input_output_aliases=aliases or {},
        compiler_params=params,
        interpret=opts.interpret,
    )(*args)
    return outs[: len(outs) - gather]
