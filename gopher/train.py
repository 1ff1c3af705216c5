"""The pure core of training: TrainState, init, train_step, eval_step.

Everything here is a pure function of its inputs; the host loop (gopher/loop.py)
jits these with shardings and owns files, clocks and progress bars.

Shape glossary: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gopher import attention as attention_lib
from gopher import cpu_kernels, optim
from gopher import loss as loss_lib
from gopher import model as model_lib
from gopher import precision as precision_lib
from gopher.config import ModelConfig, TrainConfig


class TrainState(NamedTuple):
    params: Any  # in the policy's parameter dtype (what the forward pass reads)
    opt_state: Any  # Adam moments, fp32
    master: Any  # fp32 master copy for bf16_master, else None (partitioned like opt_state)
    step: jax.Array  # int32 scalar
    rng: jax.Array  # uint32 key data (checkpointable); per-step keys are fold_in(rng, step)
    skipped: jax.Array  # int32: updates skipped for a non-finite loss or gradient


def skipped_update(state):
    """`state` after a skipped update: the step advanced, the LR schedule's count with it,
    and the skip counted. Works for any state with `step`, `skipped` and `opt_state`."""
    return state._replace(
        step=state.step + 1,
        skipped=state.skipped + 1,
        opt_state=optim.advance_schedule(state.opt_state),
    )


def keep_finite_update(new, state, loss: jax.Array, grad_norm: jax.Array):
    """`new`, unless the loss or gradient norm is non-finite: then `skipped_update(state)`."""
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, skipped_update(state))


class BatchLayout(NamedTuple):
    """How the jit path splits the batch, for gradient accumulation.

    `shards` devices hold the batch's rows in contiguous blocks, split over the mesh
    axes `axis_name`; `constraint` pins a microbatch's activations [b, T, D] at block
    boundaries (one shard's, under vmap, when `per_shard`).
    """

    shards: int = 1
    axis_name: Any = None
    constraint: Callable[[jax.Array], jax.Array] | None = None
    per_shard: bool = True  # keep each shard's gradient apart until the loop ends
    # Pins the gradient accumulator's layout (a params-shaped tree, with the shard dim
    # in front when per_shard); without it XLA may keep a whole copy on every device.
    grad_constraint: Callable[[Any], Any] | None = None


class TrainFunctions(NamedTuple):
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]
    eval_step: Callable[[Any, jax.Array], dict]
    forward: Any  # hk.Transformed


def make_train_functions(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    precision: str = "fp32",
    remat: str = "none",
    activation_constraint: Callable[[jax.Array], jax.Array] | None = None,
    fault_steps: tuple[int, ...] = (),
    batch_layout: BatchLayout | None = None,
    platform: str | None = None,
    attention: attention_lib.AttentionLayout | None = None,
) -> TrainFunctions:
    """Builds the pure functions for one model, recipe and precision setting.

    Gradients are reduced across devices by XLA (the pmap path, gopher/pmap_train.py,
    builds its own step from `forward` and reduces them itself). `fault_steps` (1-based step
    numbers) poison the gradient with NaN at those steps: a test hook for the guard.
    `batch_layout` tells gradient accumulation (train.microbatches > 1) how the batch
    is split over devices, so that each microbatch stays spread over all of them.
    `attention`: how attention runs (sharding.build_train gives the mesh's); default
    `model_cfg.attention` on `platform`, without a mesh.
    """
    policy = precision_lib.get_policy(precision)
    platform = platform or jax.default_backend()
    unroll = unroll_layers(train_cfg, model_cfg, platform)
    attention = attention or attention_lib.attention_layout(model_cfg.attention, platform)
    forward = model_lib.build_forward(
        model_cfg, policy.compute_dtype, remat, activation_constraint, attention=attention
    )
    optimizer = optim.make_optimizer(model_cfg, train_cfg)
    schedule = optim.learning_rate_schedule(model_cfg, train_cfg)

    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        dummy = jnp.zeros((1, min(8, model_cfg.seq_len)), jnp.int32)
        params32 = forward.init(init_rng, dummy)
        master = params32 if policy.fp32_master else None
        return TrainState(
            params=precision_lib.cast_params(params32, policy),
            opt_state=optimizer.init(params32),
            master=master,
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(state_rng),
            skipped=jnp.zeros((), jnp.int32),
        )

    # The loss takes the final hidden states and fuses the output layer in (gopher/loss.py).
    loss_forward = model_lib.build_forward(
        model_cfg,
        policy.compute_dtype,
        remat,
        activation_constraint,
        hidden=True,
        unroll=unroll,
        attention=attention,
    )
    # Beside the CPU attention kernel, the output layer's matmuls through its BLAS too.
    blas = cpu_kernels.blas_matmuls(attention, policy.compute_dtype)
    # There the optimizer's step too, one C++ pass per parameter (fp32 params, no master).
    fused_update = None
    if blas and policy.param_dtype == jnp.float32 and not policy.fp32_master:
        fused_update = optim.fused_update(model_cfg, train_cfg)
    value_and_grad = jax.value_and_grad(mean_loss(loss_forward, blas))
    if train_cfg.microbatches > 1:
        layout = batch_layout or BatchLayout()
        # Per shard (under vmap over the batch axes) the kernel splits heads alone.
        micro_attention = (
            dataclasses.replace(attention, batch_axes=()) if layout.per_shard else attention
        )
        micro_forward = model_lib.build_forward(
            model_cfg,
            policy.compute_dtype,
            remat,
            layout.constraint,
            hidden=True,
            unroll=unroll,
            attention=micro_attention,
        )
        value_and_grad = _accumulated_value_and_grad(micro_forward, train_cfg.microbatches, layout)

    def train_step(state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict]:
        loss, grads = value_and_grad(state.params, tokens)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if fault_steps:
            poison = jnp.isin(state.step + 1, jnp.asarray(fault_steps, jnp.int32))
            grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        grad_norm = optax.tree.norm(grads)

        def update(state):
            if fused_update is not None:
                params, opt_state = fused_update(grads, grad_norm, state.opt_state, state.params)
                return state._replace(params=params, opt_state=opt_state, step=state.step + 1)
            base = state.master if policy.fp32_master else state.params
            updates, opt_state = optimizer.update(grads, state.opt_state, base)
            key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            if policy.fp32_master:
                master = optax.apply_updates(state.master, updates)
                params = precision_lib.cast_params(master, policy)
            else:
                master = None
                params = precision_lib.apply_updates(state.params, updates, policy, key)
            return TrainState(params, opt_state, master, state.step + 1, state.rng, state.skipped)

        lr = schedule(state.step)
        # A non-finite loss or gradient skips the update (keep_finite_update's state) in a
        # branch: selecting between the new and the old state afterwards was a pass of its
        # own over the parameters and both moments.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        state = jax.lax.cond(ok, update, skipped_update, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped": state.skipped}
        return state, metrics

    def eval_step(params, tokens: jax.Array) -> dict:
        """Summed NLL (nats) per target token  [B, T]; bytes are counted by the host."""
        logits = forward.apply(params, tokens[:, :-1])
        return {"nll": model_lib.cross_entropy(logits, tokens[:, 1:])}

    return TrainFunctions(init, train_step, eval_step, forward)


# "auto" unrolls the layer loop up to these depths; a scan beyond them and on TPU (an
# unrolled 80-layer step compiles for minutes). XLA CPU: 11% faster at the nanoGPT shape
# (benchmarks/train_speed.jsonl). GPU: on an H200 the scanned step spent 15% of its GPU
# time on broadcasts and copies (seemingly the saved activations stacked into [L, ...]
# buffers) that unrolled it does not have; 1.4b ran at 44.8k tokens/s against 36.7k and
# 417m at 128.1k against 104.6k (cuDNN attention), compiling in 21 s against 9
# (benchmarks/gpu_h200/run4_*, run5_*).
UNROLL_MAX_LAYERS = {"cpu": 16, "gpu": 24, "cuda": 24}


def unroll_layers(train_cfg: TrainConfig, model_cfg: ModelConfig, platform: str) -> bool:
    """Whether the training step unrolls the layer loop (TrainConfig.unroll_layers)."""
    if train_cfg.unroll_layers == "auto":
        return model_cfg.num_layers <= UNROLL_MAX_LAYERS.get(platform, 0)
    return train_cfg.unroll_layers == "yes"


def mean_loss(forward: Any, blas: bool = False) -> Callable[[Any, jax.Array], jax.Array]:
    """(params, tokens [B, T+1]) -> mean next-token NLL in nats (fp32 logits).

    `forward` returns logits [B, T, V], or, built with hidden=True, (h, embeddings), whose
    loss fuses the output layer and the cross-entropy (gopher/loss.py; `blas`: its matmuls
    through gopher.cpu_kernels.matmul)."""

    def loss_fn(params, tokens):
        out = forward.apply(params, tokens[:, :-1])
        if isinstance(out, tuple):
            h, embeddings = out
            return loss_lib.lm_head_loss(h, embeddings, tokens[:, 1:], blas)
        return model_lib.cross_entropy(out, tokens[:, 1:]).mean()  # [B, T, V] fp32

    return loss_fn


def _accumulated_value_and_grad(forward: Any, microbatches: int, layout: BatchLayout):
    """(params, tokens [B, T+1]) -> (mean loss, mean gradient) over `microbatches` parts.

    Gradient accumulation with lax.scan: a K-trip loop inside the jitted step, so any
    batch runs on any mesh. The rows of each device's block are split K ways, so every
    microbatch is spread over all `layout.shards` devices and no row moves.

    With `layout.per_shard` (ZeRO 0 and 1) each device's gradient is kept apart (vmap
    over the shard dim, split over `layout.axis_name`) and summed over shards once,
    after the loop: the gradient is reduced once per step, not once per microbatch.
    Without it (ZeRO-3, where a per-shard gradient would be a whole unsharded copy of
    the parameters on every device) each microbatch's gradient is reduced into the
    parameters' shards, as FSDP does (XLA picks the collective: reduce-scatters for most,
    a full all-reduce then a slice for the packed q/k/v and W_R on TPU). All microbatches hold the same number
    of tokens, so the mean of their means is the batch's mean.
    """
    n, k = layout.shards, microbatches
    loss_fn = mean_loss(forward)  # of a microbatch [b, T+1] (one shard's, under vmap)

    if layout.per_shard:
        grad_fn = jax.vmap(
            jax.value_and_grad(loss_fn), in_axes=(None, 0), spmd_axis_name=layout.axis_name
        )
        lead, parts_of = (n,), 1.0 / n
    else:
        grad_fn, lead, parts_of = jax.value_and_grad(loss_fn), (), 1.0

    def value_and_grad(params, tokens):
        b = tokens.shape[0]
        if b % (n * k):
            raise ValueError(
                f"batch {b} does not split into {k} microbatches over {n} devices; use "
                f"--config.train.batch_size={-(-b // (n * k)) * n * k} or other "
                "--config.train.microbatches"
            )
        # [B, T+1] -> [K, n, B/(nK), T+1]: microbatch i takes the i-th part of every
        # device's block of rows.
        parts = tokens.reshape(n, k, b // (n * k), -1).swapaxes(0, 1)
        if not layout.per_shard:
            parts = parts.reshape(k, b // k, -1)

        pin = layout.grad_constraint or (lambda tree: tree)

        def body(carry, part):
            loss, grads = grad_fn(params, part)
            total_loss, total_grads = carry
            total_grads = jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total_grads, grads)
            return (total_loss + loss, pin(total_grads)), None

        zeros = pin(jax.tree.map(lambda p: jnp.zeros((*lead, *p.shape), jnp.float32), params))
        init = (jnp.zeros(lead, jnp.float32), zeros)
        (loss, grads), _ = jax.lax.scan(body, init, parts)
        if layout.per_shard:
            loss, grads = loss.sum(0), jax.tree.map(lambda g: g.sum(0), grads)
        scale = parts_of / k
        return loss * scale, jax.tree.map(lambda g: g * scale, grads)

    return value_and_grad
