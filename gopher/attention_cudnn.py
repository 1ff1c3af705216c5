"""Transformer-XL relative attention on cuDNN's fused (flash) attention, for GPUs.

    score(i, j) = (q_i + u) . k_j + (q_i + v) . (W_R R)_{i-j}     (q, u, v pre-scaled)

The content term is what cuDNN's flash attention computes; the position term is the one
thing it cannot: the skew (column j must hold distance i - j) is no matmul. So the
position scores are formed outside it, as two plain XLA ops, and enter as an additive
bias, whose gradient cuDNN returns:

  forward   P = (q + v) (W_R R)^T      [H, B, T, T+1], one batched matmul against distances
            bias = skew(P)              one copy: row i shifted so column j is distance i - j
            out = flash(q + u, k, v, bias, causal)
  backward  d bias from cuDNN's backward; its unskew (the copy's transpose) gives d P;
            d(q + v) = d P (W_R R) and d(W_R R) = sum over the batch of d P^T (q + v),
            two matmuls (XLA's autodiff of the two ops above).

The [H*B, T, T] bias is the price: one bf16 copy each way per layer (1 GiB at B 8, H 16,
T 2048), kept for the backward unless the layer is rematerialised. Entries above the
diagonal are the skew's leftovers; the causal mask drops them and their gradient is 0.

cuDNN returns the bias gradient only for a bias of batch 1 (jax-ml/jax#30593: with a
batch of bias it may return zeros), so the batch is folded into the heads: attention is
independent per (sequence, head), and [1, T, H*B, K] with a [1, H*B, T, T] bias computes
the same thing (heads first: the position matmul's output order, so the bias needs no
transpose). cuDNN takes bf16 or fp16 only, and masks other than the causal one are
not supported here (use the XLA path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gopher.attention_xla import _skew

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
PLATFORMS = ("gpu", "cuda")


def platform_problem(platform: str, device_kind: str = "") -> str | None:
    """Why cuDNN cannot run on these devices (one line), or None."""
    vendor_not_nvidia = any(w in device_kind.upper() for w in ("AMD", "INSTINCT", "RADEON"))
    if platform not in PLATFORMS or vendor_not_nvidia:
        return (
            f"attention = 'cudnn' needs an NVIDIA GPU, not {device_kind or platform!r} devices; "
            "use --config.model.attention=xla (or auto)"
        )
    return None


def unsupported(dtype, mask, t: int, platform: str = "gpu", device_kind: str = "") -> str | None:
    """Why cuDNN's attention cannot take these (a one-line message), or None when it can."""
    if problem := platform_problem(platform, device_kind):
        return problem
    if mask is not None:
        return (
            "attention = 'cudnn' is causal only: pass mask=None, or use "
            "--config.model.attention=xla for another mask"
        )
    if jnp.dtype(dtype) not in DTYPES:
        return (
            f"attention = 'cudnn' needs bf16 or fp16 activations, not {jnp.dtype(dtype)}: "
            "train with --config.train.precision=mixed (or bf16, bf16_sr), or use "
            "--config.model.attention=xla"
        )
    if t % 2:
        return (
            f"attention = 'cudnn' needs an even sequence length with a bias (cuDNN), not {t}; "
            "use --config.model.attention=xla"
        )
    return None


def position_bias(qv: jax.Array, r: jax.Array) -> jax.Array:
    """(q + v) . (W_R R)_{i-j} for j <= i (garbage above the diagonal), heads first, as
    cuDNN takes the batch folded into them.  # [H*B, T, T]

    qv [B, T, H, K]; r [H, T+1, K] over distances T ... 0. The matmul against all T+1
    distances comes out [H, B, T, T+1] as it is computed (the head is the matmul's batch
    dimension: no transpose), and the skew is one slice of that buffer flattened
    (`attention_xla._skew`): a single copy, whose transpose in the backward is one pad."""
    b, t, h, _ = qv.shape
    position = jnp.einsum("bthk,hmk->hbtm", qv, r)  # [H, B, T, T+1]: distances T ... 0
    return _skew(position.reshape(h * b, t, t + 1), t)


def relative_attention(q, k, v, r, u, v_bias, mask=None, chunk=None, *, implementation="cudnn"):
    """`gopher.attention_xla.relative_attention`'s signature and layout (q pre-scaled, k, v
    [B, T, H*K] -> [B, T, H*K]; r [H, T+1, K]; u, v_bias [H, 1, K]), causal only.

    `implementation` is jax.nn.dot_product_attention's: "cudnn" (GPU), or "xla" for the
    same arithmetic on any backend (the tests' oracle check on CPU)."""
    del chunk
    if implementation == "cudnn":
        why_not = unsupported(q.dtype, mask, q.shape[1])
        if why_not:
            raise ValueError(why_not)
    elif mask is not None:
        raise ValueError(unsupported(q.dtype, mask, q.shape[1]))
    h = r.shape[0]
    b, t, d = q.shape
    kd = d // h
    q, k, v = (x.reshape(b, t, h, kd) for x in (q, k, v))

    def fold(x):  # [B, T, H, K] -> [1, T, H*B, K]: the batch as more heads, heads first
        return x.transpose(1, 2, 0, 3).reshape(1, t, h * b, kd)

    out = jax.nn.dot_product_attention(
        fold(q + u[:, 0]),
        fold(k),
        fold(v),
        bias=position_bias(q + v_bias[:, 0], r)[None],  # [1, H*B, T, T]
        scale=1.0,
        is_causal=True,
        implementation=implementation,
    )  # [1, T, H*B, K]
    return out.reshape(t, h, b, kd).transpose(2, 0, 1, 3).reshape(b, t, d)
