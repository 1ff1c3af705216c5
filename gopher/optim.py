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
