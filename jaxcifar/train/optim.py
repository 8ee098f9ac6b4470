"""Optimizers and learning-rate schedules from optax.

The peak learning rate and weight decay are injected hyper-parameters (``optax.inject_hyperparams``):
they live in the optimizer state as arrays, so ``jax.vmap`` over states trains runs with different
values in one program. Schedules are unit-peak multipliers of that learning rate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

from jaxcifar.train.config import TrainConfig


def unit_schedule(c: TrainConfig, steps_per_epoch: int) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Multiplier of the peak learning rate as a function of the step (peak 1)."""
    total = max(1, c.epochs * steps_per_epoch)
    warmup = int(c.warmup_epochs * steps_per_epoch)
    if c.schedule == "constant":
        base = optax.constant_schedule(1.0)
    elif c.schedule == "step":
        base = optax.piecewise_constant_schedule(
            1.0, {int(e * steps_per_epoch): c.step_factor for e in c.step_epochs}
        )
    elif c.schedule == "cosine":
        base = optax.cosine_decay_schedule(1.0, total)
    elif c.schedule == "warmup_cosine":
        base = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, warmup), total)
        warmup = 0
    else:  # "onecycle"
        base = optax.cosine_onecycle_schedule(total, 1.0)
    if warmup and c.schedule in ("constant", "step", "cosine"):
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), base], [warmup])
    return base


def make_optimizer(c: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation for ``c``; hyper-parameters ``learning_rate`` and ``weight_decay``
    are injected (see module docstring)."""
    schedule = unit_schedule(c, steps_per_epoch)

    def factory(learning_rate, weight_decay):
        lr = lambda count: learning_rate * schedule(count)  # noqa: E731
        parts = [optax.clip_by_global_norm(c.grad_clip_norm)] if c.grad_clip_norm else []
        if c.optimizer == "adamw":
            parts.append(optax.adamw(lr, c.b1, c.b2, weight_decay=weight_decay))
        else:
            parts.append(optax.add_decayed_weights(weight_decay))
            if c.optimizer == "sgd":
                parts.append(optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))
            else:
                parts.append(optax.adam(lr, c.b1, c.b2))
        return optax.chain(*parts)

    return optax.inject_hyperparams(factory)(learning_rate=c.learning_rate, weight_decay=c.weight_decay)


def make_plateau(c: TrainConfig) -> optax.GradientTransformationExtraArgs | None:
    """Reduce-on-plateau of the validation loss, stepped once per epoch; ``None`` when off."""
    if c.plateau_patience is None:
        return None
    return optax.contrib.reduce_on_plateau(factor=c.plateau_factor, patience=c.plateau_patience)
