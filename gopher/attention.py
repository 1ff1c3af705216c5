"""Transformer-XL relative attention (Gopher's position scheme): which implementation
computes it, and the Haiku module.

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . (W_R R)_{i-j}] / sqrt(K)

R is the fixed sinusoid table over distances and W_R a per-layer projection of it
(the 13th d^2 of each block). Two implementations behind `attend`, chosen by
`ModelConfig.attention` ("auto": the Pallas kernels of gopher/pallas_attention.py on
TPU, cuDNN's flash attention with the position scores as a bias on GPU
(gopher/attention_cudnn.py), on CPU the fused C++ kernel of gopher/cpu_kernels.py in
fp32, and the XLA path of gopher/attention_xla.py wherever the others cannot run): the
kernel cannot be
split by XLA's partitioner, so under a mesh it runs inside `shard_map`, batch over the
data axes and heads over "model", as the XLA path is split.

Shape glossary:
  B: batch size   T: sequence length (queries = keys, no memory)   H: heads
  K: key size     C: query chunk length   S: keys a query chunk sees (end of the chunk)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P

from gopher import attention_cudnn, cpu_kernels, pallas_attention
from gopher.attention_xla import (
    MAX_QUERY_CHUNKS,
    QUERY_CHUNK,
    grouped_relative_attention,
    heads_per_group,
    relative_attention,
)
from gopher.config import ModelConfig
from gopher.layers import Dense, linear

# Where "auto" picks the Pallas kernel. Not GPU: on one H200 (jax 0.11.2, mixed precision,
# seq 2048, batch 8) the Triton kernels' backward made the train step slower than the XLA
# path's (417m 66.9k vs 81.9k tokens/s; 1.4b without remat 24.4k vs 26.8k with full remat),
# though it needs far less memory (1.4b: 47.5 GiB peak with no remat at all);
# benchmarks/gpu_h200/, README "GPU". attention="pallas" still picks it there.
KERNEL_PLATFORMS = ("tpu",)


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    """How `attend` computes: "xla", "pallas", "pallas_fused" (the kernel with its
    one-kernel backward), "cudnn" or "cpu" (the C++ kernel) on `platform` (the Pallas
    kernel runs in interpret mode on "cpu"), and, with a `mesh`, the kernel's shard_map:
    the batch over `batch_axes`, heads over `head_axis`."""

    implementation: str = "xla"
    platform: str = "cpu"
    mesh: Any = None
    batch_axes: tuple[str, ...] = ()
    head_axis: str = "model"
    device_kind: str = ""  # e.g. "TPU v4": the kernel's skew depends on the TPU generation
    # What runs where `implementation` cannot ("auto"'s choice of cudnn or cpu: "xla").
    fallback: str | None = None


def attention_layout(
    choice: str, platform: str, mesh: Any = None, batch_axes: tuple[str, ...] = ()
) -> AttentionLayout:
    """The layout for `ModelConfig.attention` = `choice` ("auto", "xla", "pallas",
    "pallas_fused", "cudnn", "cpu") on devices of `platform` (the mesh's, else the first
    of the platform's devices); "auto" is the kernel on TPU v4+, cuDNN on GPU and the C++
    kernel on CPU (each with XLA where it cannot run), XLA elsewhere."""
    if choice == "pallas_fused" and "fused" not in pallas_attention.backwards_for(platform):
        raise ValueError(
            "attention = 'pallas_fused' needs atomic adds, which TPU kernels do not have; "
            "use --config.model.attention=pallas on TPU"
        )
    if mesh is not None:
        kind = mesh.devices.flat[0].device_kind
    else:
        try:
            kind = jax.devices(platform)[0].device_kind
        except RuntimeError:  # no such backend here (e.g. planning for another platform)
            kind = ""
    cudnn_problem = attention_cudnn.platform_problem(platform, kind)
    if choice == "cudnn" and cudnn_problem:
        raise ValueError(cudnn_problem)
    fallback = None
    if choice == "auto" and not cudnn_problem:
        # cuDNN's flash attention with the position bias (gopher/attention_cudnn.py), the XLA
        # path where it cannot run (fp32, a mask of its own, odd T, a GPU without it): on an
        # H200 with scanned layers, 1.4b's step ran at 36.7k tokens/s against the XLA path's
        # best (26.8k, full remat), 417m's at 104.6k against 83.1k
        # (benchmarks/gpu_h200/run3_*, run4_*).
        choice, fallback = "cudnn", "xla"
    if choice == "cpu" and platform != "cpu":
        raise ValueError(
            f"attention = 'cpu' is the CPU's kernel, not {platform}'s; "
            "use --config.model.attention=auto"
        )
    if choice == "auto" and platform == "cpu":
        # The fused C++ kernel (gopher/cpu_kernels.py), XLA's where it cannot run (bf16, a
        # mask of its own, no compiler or BLAS): at the nanoGPT shape on 2 Xeon cores,
        # 80-91 ms a layer forward and backward against XLA's 157-195 (README, Benchmarks).
        choice, fallback = "cpu", "xla"
    if choice == "auto":
        choice = "pallas" if platform in KERNEL_PLATFORMS else "xla"
        generation = pallas_attention.tpu_generation(kind) if platform == "tpu" else None
        if generation is not None and generation < pallas_attention.MIN_TPU_GENERATION:
            choice = "xla"  # TPU v2, v3: the kernel does not compile there
    return AttentionLayout(
        choice, platform, mesh, tuple(batch_axes), device_kind=kind, fallback=fallback
    )


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
    if layout.implementation == "cpu":
        why_not = cpu_kernels.unsupported(qkv.dtype, mask)
        if why_not and layout.fallback:
            logging.log_first_n(logging.INFO, "attention: %s; XLA's instead", 1, why_not)
            fallback = dataclasses.replace(layout, implementation=layout.fallback, fallback=None)
            return attend(qkv, r, u, v_bias, mask, chunk, fallback)
        if why_not:
            raise ValueError(
                f"attention = 'cpu' cannot run: {why_not}; use --config.model.attention=xla"
            )
        return _on_each_device(cpu_kernels.relative_attention, layout, qkv, r, u, v_bias)
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
    if layout.implementation == "cudnn":
        fallback = dataclasses.replace(layout, implementation=layout.fallback, fallback=None)
        why_not = attention_cudnn.unsupported(
            qkv.dtype, mask, t, layout.platform, layout.device_kind
        )
        if why_not and layout.fallback:
            logging.log_first_n(logging.INFO, "attention: %s; XLA's instead", 1, why_not)
            return attend(qkv, r, u, v_bias, mask, chunk, fallback)
        if why_not:
            raise ValueError(why_not)

        def cudnn(qkv, r, u, v_bias):
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            return attention_cudnn.relative_attention(q, k, v, r, u, v_bias, mask=mask)

        try:
            return _on_each_device(cudnn, layout, qkv, r, u, v_bias)
        except (NotImplementedError, RuntimeError) as e:  # jax's cuDNN checks: sm80+, cuDNN 9
            if not layout.fallback:
                raise
            logging.log_first_n(logging.WARNING, "attention: cuDNN cannot: %s; XLA's", 1, e)
            return attend(qkv, r, u, v_bias, mask, chunk, fallback)
    backward = "fused" if layout.implementation == "pallas_fused" else "split"
    opts = pallas_attention.options_for(
        layout.platform, device_kind=layout.device_kind, backward=backward
    )

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
        # Beside the CPU kernel (one device) the projections' matmuls go through its BLAS
        # too; elsewhere the einsum keeps [D, 3, H*K]'s sharding of H*K over "model".
        blas = cpu_kernels.blas_matmuls(self.layout, dt)
        if blas:
            w_flat = w_qkv.reshape(x.shape[-1], 3 * h * k)
            qkv = linear(x, w_flat, blas).reshape(*x.shape[:2], 3, h * k)
        else:
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
        w_o = Dense(c.d_model, self.out_stddev, name="o").weight(h * k).astype(dt)
        return linear(out, w_o, blas)  # [B, T, D]
