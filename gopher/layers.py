"""The model's building blocks with hand-written backward passes (jax.custom_vjp).

Each is tested against autodiff of its plain formula (tests/test_model.py):
- the MLP keeps its input and pre-activation and recomputes the gelu;
- RMSNorm keeps its input and the per-row inverse norm;
- Dense is a bias-free linear map whose fp32 weights are cast to the input's dtype.
Left to autodiff, XLA kept several activation-sized residuals per layer; scratch
memory is fresh memory on every step, and its page faults took much of the step
time on XLA CPU.
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp

from gopher import cpu_kernels
from gopher.cpu_kernels import matmul


def sum_over_batch(x: jax.Array) -> jax.Array:
    """x.sum(0) as a matmul with ones: XLA CPU's reduce over a major dim is ~50x slower."""
    ones = jnp.ones((x.shape[0],), x.dtype)
    return jnp.einsum("b,b...->...", ones, x, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def mlp(x: jax.Array, w_in: jax.Array, w_out: jax.Array, blas: bool = False) -> jax.Array:
    """gelu(x w_in) w_out  (gelu in its tanh form), [..., D] -> [..., D].

    The backward pass keeps only x and the pre-activation and recomputes the gelu;
    left to autodiff, XLA kept five [B, T, F] residuals per layer and wrote the
    gelu gradient transposed, which cost more than the MLP's matmuls. `blas`: its six
    matmuls through gopher.cpu_kernels.matmul (XLA CPU, fp32, one device) instead of
    XLA's dots, and the gelu, its recompute and its gradient as C++ passes
    (cpu_kernels.gelu, gelu_backward).
    """
    return _mlp_fwd(x, w_in, w_out, blas)[0]


def _mlp_fwd(x, w_in, w_out, blas):
    if blas:
        x2 = x.reshape(-1, x.shape[-1])  # [B*T, D]
        pre = matmul(x2, w_in)  # [B*T, F]
        y = matmul(cpu_kernels.gelu(pre), w_out).reshape(x.shape)
        return y, (x, pre.reshape(*x.shape[:-1], -1), w_in, w_out)
    pre = jnp.dot(x, w_in)  # [..., F]
    return jnp.dot(jax.nn.gelu(pre), w_out), (x, pre, w_in, w_out)


def _mlp_bwd(blas, residuals, dy):
    x, pre, w_in, w_out = residuals
    lead = x.shape[:-1]
    x, pre, dy = (a.reshape(-1, a.shape[-1]) for a in (x, pre, dy))  # [B*T, .]
    if blas:
        # The gelu's recompute and gradient in one C++ pass after dy w_out^T.
        act, d_pre = cpu_kernels.gelu_backward(pre, matmul(dy, w_out, tb=True))
        dw_out = matmul(act, dy, ta=True)
        dw_in = matmul(x, d_pre, ta=True)
        dx = matmul(d_pre, w_in, tb=True)
        return dx.reshape(*lead, -1), dw_in, dw_out
    # The gelu's recompute made to depend on dy: left free, XLA CPU scheduled every unrolled
    # layer's recompute early and kept two [B*T, F] buffers per layer live across the
    # backward pass (nanoGPT shape: temporaries 1.95 -> 1.45 GiB). x * 0 is not folded.
    pre = pre + 0.0 * dy[:1, :1].astype(pre.dtype)
    act, gelu_vjp = jax.vjp(jax.nn.gelu, pre)
    dw_out = jnp.einsum("nf,nd->fd", act, dy)
    (d_pre,) = gelu_vjp(jnp.einsum("nd,fd->nf", dy, w_out))
    dw_in = jnp.einsum("nd,nf->df", x, d_pre)
    dx = jnp.einsum("nf,df->nd", d_pre, w_in)
    return dx.reshape(*lead, -1), dw_in, dw_out


mlp.defvjp(_mlp_fwd, _mlp_bwd)


def linear(x: jax.Array, w: jax.Array, blas: bool = False) -> jax.Array:
    """x @ w, x [..., D_in], w [D_in, D_out] (one dtype) -> [..., D_out]. `blas`: forward and
    backward (dx = dy w^T, dw = x^T dy) through gopher.cpu_kernels.matmul (XLA CPU, fp32,
    one device), as the MLP's. For attention's projections at the nanoGPT shape: XLA CPU
    made the q/k/v projection's two backward matmuls at 144 GFLOP/s (from [B, T, 3, H*K],
    with a transposed copy of the gradient first), MKL at ~300."""
    if not blas:
        return jnp.dot(x, w)
    return _blas_linear(x, w)


@jax.custom_vjp
def _blas_linear(x, w):
    return _blas_linear_fwd(x, w)[0]


def _blas_linear_fwd(x, w):
    y = matmul(x.reshape(-1, x.shape[-1]), w)
    return y.reshape(*x.shape[:-1], w.shape[1]), (x, w)


def _blas_linear_bwd(residuals, dy):
    x, w = residuals
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return matmul(dy2, w, tb=True).reshape(x.shape), matmul(x2, dy2, ta=True)


_blas_linear.defvjp(_blas_linear_fwd, _blas_linear_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, blas: bool = False) -> jax.Array:
    """x * scale / sqrt(mean(x^2) + eps) over the last axis, as hk.RMSNorm computes it.

    The backward pass keeps x and the per-row inverse norm [..., 1]; autodiff kept
    six arrays the size of x (scale and inverse norm broadcast to it, products). `blas`
    (fp32, beside the CPU kernels): both passes in C++, one over each row
    (cpu_kernels.rms_norm, rms_norm_backward), where XLA CPU made two and six.
    """
    return _rms_norm_fwd(x, scale, eps, blas)[0]


def _rms_norm_fwd(x, scale, eps, blas):
    if blas:
        y, inv = cpu_kernels.rms_norm(x.reshape(-1, x.shape[-1]), scale, eps)
        return y.reshape(x.shape), (x, scale, inv.reshape(*x.shape[:-1], 1))
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return x * scale * inv, (x, scale, inv)


def _rms_norm_bwd(eps, blas, residuals, dy):
    del eps
    x, scale, inv = residuals
    if blas:
        d = x.shape[-1]
        dx, d_scale = cpu_kernels.rms_norm_backward(
            x.reshape(-1, d), scale, inv.reshape(-1), dy.reshape(-1, d)
        )
        return dx.reshape(x.shape), d_scale
    g = dy * scale
    mean_gx = jnp.mean(g * x, axis=-1, keepdims=True)
    dx = inv * g - (inv**3 * mean_gx) * x
    d_scale = sum_over_batch((dy * x * inv).reshape(-1, x.shape[-1]))
    return dx, d_scale.astype(scale.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(hk.Module):
    """hk.RMSNorm's parameters (`scale` [D], ones) and maths, with `_rms_norm`'s backward."""

    def __init__(self, eps: float, name: str | None = None, blas: bool = False):
        super().__init__(name=name)
        self.eps = eps
        self.blas = blas

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", x.shape[-1:], x.dtype, init=jnp.ones)
        return _rms_norm(x, scale, self.eps, self.blas)


def rms_norm(x: jax.Array, eps: float, name: str, blas: bool = False) -> jax.Array:
    """RMSNorm computed in fp32 and returned in the input dtype (`blas`: in C++, for fp32
    activations beside the CPU kernels)."""
    y = RMSNorm(eps, name=name, blas=blas)(x.astype(jnp.float32))
    return y.astype(x.dtype)
