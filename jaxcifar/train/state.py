"""Training state: a plain pytree (a ``flax.struct`` dataclass) so ``jit``, ``vmap`` and sharding apply."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

DATA_STREAM = 0x5EED  # fold-in tag that separates the data-order stream from the per-step stream


@struct.dataclass
class TrainState:
    """All that changes during training (optionally with a leading run axis when runs are vmapped).

    ``rng`` is the run's base key (raw uint32 [2]); per-step keys are ``fold_in(rng, step)`` and the
    epoch order ``fold_in(fold_in(rng, DATA_STREAM), epoch)``, so results depend only on (seed, step).
    ``best_params``/``best_batch_stats`` hold the weights of the best validation epoch so far.
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    plateau: Any  # optax reduce_on_plateau state, or () when off
    step: jax.Array  # int32 []
    rng: jax.Array  # uint32 [2]
    dropout_rate: jax.Array  # float32 []; a traced hyper-parameter
    best_params: Any
    best_batch_stats: Any
    best_val_accuracy: jax.Array  # float32 []
    best_epoch: jax.Array  # int32 []; 0 = none yet
    epoch: jax.Array  # int32 []; completed epochs
    ema: Any = ()  # {'params', 'batch_stats'}: moving average of the weights (config.ema_decay), or () when off
    # int32 []: the epoch in which the run's loss became NaN/inf (0: never); in a sweep its weights get no
    # updates from then on while the other runs go on. () only in states built by hand (the field was added
    # after the others, so it needs a default).
    diverged_at: Any = ()

    @property
    def variables(self) -> dict[str, Any]:
        """The current ``{'params', 'batch_stats'}`` for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def best_variables(self) -> dict[str, Any]:
        """The best epoch's ``{'params', 'batch_stats'}`` (by the selection metric)."""
        return {"params": self.best_params, "batch_stats": self.best_batch_stats}

    def weights(self, which: str) -> dict[str, Any]:
        """``model.apply`` variables: ``'current'``, ``'best'`` or ``'ema'`` (the moving average)."""
        if which == "ema":
            if self.ema == ():
                raise ValueError("this state keeps no moving average: set TrainConfig.ema_decay")
            return self.ema
        return self.best_variables if which == "best" else self.variables


def stack_states(states: list[TrainState]) -> TrainState:
    """Stack single-run states along a new leading run axis (one compiled program: leaf by leaf, every
    distinct leaf shape would compile its own stack)."""
    return _stack(*states)


@jax.jit
def _stack(*states: TrainState) -> TrainState:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(state: TrainState, run: int) -> TrainState:
    """Run ``run`` of a stacked state."""
    return jax.tree.map(lambda x: x[run], state)
