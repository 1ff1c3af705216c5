"""The training loss with its output layer fused in: mean NLL of h @ E^T, never [B, T, V].

The tied output layer and the softmax cross-entropy are a third of a small model's step
(44m at seq 512: the [4096, 32000] fp32 logits are 0.5 GB, written and read by the
matmul, the log-sum-exp, the scatter of the target's gradient, a transposed copy for the
embedding's gradient, and the softmax again in the backward pass). Here the loss and its
gradient are computed together, one chunk of positions at a time, in the forward pass:

    logits_c = h_c E^T                  [B, C, V] fp32, one chunk of C positions
    p_c = softmax(logits_c)             one exp per logit
    loss += sum(logsumexp - logit of the target)
    g_c = (p_c - onehot(target)) / N    the loss's gradient in the logits, fp32
    dh_c = g_c E,  dE^T += h_c^T g_c    the two backward matmuls, at once

The backward pass only scales (dh, dE) by the incoming cotangent: no logits are kept and
none are recomputed (the same three matmuls as autodiff, no fourth). Chunks run along
the sequence, so each keeps the batch's sharding over the data axes and the vocabulary's
over "model". The loss is the plain mean over every target (training has no mask).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gopher.cpu_kernels import matmul, softmax_xent

# Positions per chunk along the sequence: [B, C, V] fp32 per chunk (8 x 64 x 32000 x 4 B
# = 66 MB at the benchmark shape) instead of the whole [B, T, V]. The step's peak memory
# is at the loss: at the nanoGPT shape 64 gave temporaries of 1.10 GiB, 128 1.20 and 256
# 1.45, and 64 and 128 the same speed (256 was 2% slower).
LOSS_CHUNK = 64


def lm_head_loss(
    h: jax.Array, embeddings: jax.Array, targets: jax.Array, blas: bool = False
) -> jax.Array:
    """Mean next-token NLL in nats of logits h @ embeddings^T.

    h [B, T, D] (the compute dtype), embeddings [V, D] (fp32 parameters), targets [B, T]
    int -> scalar fp32. Equal to cross_entropy(einsum("btd,vd->btv", h, E)).mean() and
    to its gradient (tests/test_loss.py); the logits are fp32 whatever h's dtype is.
    `blas`: its matmuls through gopher.cpu_kernels.matmul (XLA CPU, fp32, one device).
    """
    t = h.shape[1]
    chunk = min(LOSS_CHUNK, t)
    return _fused(h, embeddings, targets.astype(jnp.int32), chunk, blas)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(h, embeddings, targets, chunk, blas):
    return _loss_and_grads(h, embeddings, targets, chunk, blas)[0]


def _chunk_loss_and_grads(hc, tc, e, n, blas, d_emb_t):
    """One chunk's summed NLL, d loss / d h_c, and d_emb_t plus its share of d loss / d E^T."""
    b, c, d = hc.shape
    if blas:
        # The same maths in three BLAS calls and one pass over the logits in C++, the
        # chunk's d E^T summed into d_emb_t by its GEMM (gopher/csrc/cpu_kernels.cc).
        h2 = hc.reshape(b * c, d)
        g, nll_rows = softmax_xent(matmul(h2, e, tb=True), tc.reshape(-1), 1.0 / n)
        d_h = matmul(g, e).reshape(b, c, d)
        return jnp.sum(nll_rows), d_h, matmul(h2, g, ta=True, add_to=d_emb_t)
    logits = jnp.einsum("bcd,vd->bcv", hc, e, preferred_element_type=jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    ex = jnp.exp(logits - top)
    z = jnp.sum(ex, axis=-1, keepdims=True)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    onehot = vocab == tc[..., None]
    # A gather of B*C logits, not a masked sum over [B, C, V] (one more pass over the
    # chunk's 131 MB of logits at the nanoGPT shape).
    target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    nll = jnp.sum(top[..., 0] + jnp.log(z[..., 0]) - target_logit)
    g = ((ex / z - onehot.astype(jnp.float32)) * (1.0 / n)).astype(hc.dtype)  # d loss / d logits
    # d E^T = h_c^T g_c [D, V], transposed once after the last chunk: as [V, D], XLA CPU
    # copied every chunk's [B*C, V] g to a transposed layout first (half of a 1-layer
    # model's step; 4% of the nanoGPT shape's).
    d_h = jnp.einsum("bcv,vd->bcd", g, e, preferred_element_type=jnp.float32)
    d_e_t = jnp.einsum("bcd,bcv->dv", hc, g, preferred_element_type=jnp.float32)
    return nll, d_h.astype(hc.dtype), d_emb_t + d_e_t


def _loss_and_grads(h, embeddings, targets, chunk, blas):
    b, t, d = h.shape
    n = b * t
    e = embeddings.astype(h.dtype)
    full, tail = divmod(t, chunk)
    total = jnp.zeros((), jnp.float32)
    d_emb_t = jnp.zeros(embeddings.shape[::-1], jnp.float32)  # [D, V]
    d_h = []
    if full:
        # A loop, not unrolled chunks: one chunk's [B, C, V] buffers are live at a time.
        hs = h[:, : full * chunk].reshape(b, full, chunk, d).swapaxes(0, 1)  # [K, B, C, D]
        ts = targets[:, : full * chunk].reshape(b, full, chunk).swapaxes(0, 1)

        def body(carry, xs):
            total, d_emb_t = carry
            nll, dh, d_emb_t = _chunk_loss_and_grads(*xs, e, n, blas, d_emb_t)
            return (total + nll, d_emb_t), dh

        (total, d_emb_t), dhs = jax.lax.scan(body, (total, d_emb_t), (hs, ts))
        d_h.append(dhs.swapaxes(0, 1).reshape(b, full * chunk, d))
    if tail:
        nll, dh, d_emb_t = _chunk_loss_and_grads(
            h[:, full * chunk :], targets[:, full * chunk :], e, n, blas, d_emb_t
        )
        total = total + nll
        d_h.append(dh)
    # (behind a barrier: with one chunk XLA would fold the transpose into its matmul as a
    # transposed operand, which XLA CPU's dot kernels take in fp32 only: bf16 failed to run)
    d_emb = jax.lax.optimization_barrier(d_emb_t).T
    grads = (jnp.concatenate(d_h, axis=1), d_emb.astype(embeddings.dtype))
    return total / n, grads


def _fused_fwd(h, embeddings, targets, chunk, blas):
    loss, grads = _loss_and_grads(h, embeddings, targets, chunk, blas)
    return loss, grads


def _fused_bwd(chunk, blas, grads, cotangent):
    del chunk, blas
    d_h, d_emb = grads
    return (
        (d_h * cotangent).astype(d_h.dtype),
        (d_emb * cotangent).astype(d_emb.dtype),
        None,  # targets: integers
    )


_fused.defvjp(_fused_fwd, _fused_bwd)
