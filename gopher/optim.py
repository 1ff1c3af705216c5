"""The optax chain and Gopher's learning-rate schedule.

clip by global norm -> Adam (or AdamW) -> LR: linear warm-up from 1e-7 to the
max over `warmup_steps`, then a cosine decay to max/10 at the end of training
(a cosine cycle matched to the run length: Chinchilla App. B). The schedule runs on
tokens seen, so when the batch doubles (Gopher 280b, 3M -> 6M tokens) the cosine
advances twice as far per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gopher import cpu_kernels
from gopher.config import ModelConfig, TrainConfig


def max_lr(model: ModelConfig, train: TrainConfig) -> float:
    return train.max_lr if train.max_lr is not None else model.max_lr


def clip_norm(model: ModelConfig, train: TrainConfig) -> float:
    return train.clip_norm if train.clip_norm is not None else model.clip_norm


def learning_rate_schedule(model: ModelConfig, train: TrainConfig) -> optax.Schedule:
    """step -> LR: warm-up from `warmup_init_lr` to the max over the first `warmup_steps`'
    tokens, then a cosine to `final_lr_ratio` * max at the run's last token.

    `step` counts the updates before this one (optax's count; the LR of 1-based step s is
    schedule(s - 1)); it is turned into tokens seen, in units of one `batch_size` step
    (`TrainConfig.base_steps_seen`), so without a batch schedule this is exactly the
    step-based warm-up and cosine.
    """
    peak = max_lr(model, train)
    warmup = train.base_steps_seen(min(train.warmup_steps, train.steps))
    total = train.base_steps_seen(train.steps)
    on_tokens = optax.warmup_cosine_decay_schedule(
        init_value=train.warmup_init_lr,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 1),
        end_value=peak * train.final_lr_ratio,
    )
    return lambda step: on_tokens(train.base_steps_seen(step, maximum=jnp.maximum))


def make_update_rule(model: ModelConfig, train: TrainConfig) -> optax.GradientTransformation:
    """The chain after clipping: Adam, optional decoupled weight decay, the LR schedule.

    Kept separate so the pmap path, which clips with a norm over every device's shard,
    runs exactly the same rule on its shard.
    """
    parts = [optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps)]
    if train.optimizer == "adamw" and train.weight_decay > 0:
        parts.append(optax.add_decayed_weights(train.weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate_schedule(model, train)))
    return optax.chain(*parts)


def advance_schedule(opt_state):
    """`opt_state` with the LR schedule's step count advanced by one and nothing else: a
    skipped (non-finite) update leaves the moments as they were, but the schedule
    follows the steps (and tokens) the run has taken, so the cosine still ends on the
    run's last step and the logged LR is the one applied."""

    def is_schedule(x):
        return isinstance(x, optax.ScaleByScheduleState)

    return jax.tree.map(
        lambda x: x._replace(count=x.count + 1) if is_schedule(x) else x,
        opt_state,
        is_leaf=is_schedule,
    )


def make_optimizer(model: ModelConfig, train: TrainConfig) -> optax.GradientTransformation:
    """The update rule, producing fp32 updates to be added to the (master) params."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm(model, train)), make_update_rule(model, train)
    )


def fused_update(model: ModelConfig, train: TrainConfig):
    """`make_optimizer`'s step and `optax.apply_updates` as one C++ pass per fp32 parameter
    (gopher.cpu_kernels.adam), for XLA CPU where the kernels run: (grads, their global norm,
    opt_state, params) -> (params, opt_state), the state in make_optimizer's structure (so
    checkpoints and the other paths read it). XLA CPU made four passes over each parameter's
    arrays and took the global norm a second time inside optax's clipping."""
    b1, b2, eps = train.b1, train.b2, train.eps
    decay = train.weight_decay if train.optimizer == "adamw" else 0.0
    schedule = learning_rate_schedule(model, train)
    max_norm = clip_norm(model, train)

    def is_state(x):
        return isinstance(x, optax.ScaleByAdamState | optax.ScaleByScheduleState)

    def update(grads, grad_norm, opt_state, params):
        states = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
        (adam,) = [x for x in states if isinstance(x, optax.ScaleByAdamState)]
        (sched,) = [x for x in states if isinstance(x, optax.ScaleByScheduleState)]
        count = optax.safe_increment(adam.count)
        scalars = jnp.stack(
            [grad_norm, max_norm, 1 - b1**count, 1 - b2**count, -schedule(sched.count)]
        ).astype(jnp.float32)
        leaves, treedef = jax.tree.flatten(params)
        steps = [
            cpu_kernels.adam(g, m, v, p, scalars, b1, b2, eps, 0.0, decay)
            for g, m, v, p in zip(
                treedef.flatten_up_to(grads),
                treedef.flatten_up_to(adam.mu),
                treedef.flatten_up_to(adam.nu),
                leaves,
                strict=True,
            )
        ]
        mu, nu, new_params = (treedef.unflatten(list(x)) for x in zip(*steps, strict=True))
        new = {
            optax.ScaleByAdamState: adam._replace(count=count, mu=mu, nu=nu),
            optax.ScaleByScheduleState: sched._replace(count=optax.safe_increment(sched.count)),
        }
        opt_state = jax.tree.map(
            lambda x: new[type(x)] if is_state(x) else x, opt_state, is_leaf=is_state
        )
        return new_params, opt_state

    return update
