"""Pure training and evaluation steps, and the compiled chunk of steps that makes up an epoch.

``train_step(state, batch, key) -> (state, metrics)`` with ``batch = (images uint8 [B,32,32,3],
labels int32 [B])``. :func:`make_chunk_runner` runs K steps over on-device data inside one compiled
program: ``lax.scan`` (rolled: the whole epoch as one loop, best on GPU/TPU) or fully unrolled (best on
XLA:CPU, where convolution gradients inside a while loop fall back to a slow generic kernel).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcifar.data.augment import AugmentFn
from jaxcifar.data.stats import normalize
from jaxcifar.train.optim import reset_lookahead, synced_batch_stats
from jaxcifar.train.state import TrainState

Metrics = dict[str, jax.Array]


@dataclass(frozen=True)
class StepFns:
    """The static pieces a step closes over: the model, the optimizer ``tx`` (with injected ``learning_rate``
    and ``weight_decay``), the once-per-epoch ``plateau`` transform (or None), augmentation, input
    statistics, loss settings and compute dtype. Every method is a pure function of its arguments."""

    model: nn.Module
    tx: optax.GradientTransformation
    augment: AugmentFn
    mean: Any  # float32 [3]
    std: Any  # float32 [3]
    label_smoothing: float
    num_classes: int
    compute_dtype: Any
    batch_sharding: Any = None  # NamedSharding of a batch over the data-parallel mesh; None on one device
    tta: int = 0  # test-time augmentation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts
    plateau: optax.GradientTransformationExtraArgs | None = None  # reduce-on-plateau, stepped per epoch

    def fresh_state(self, seed: int, hyperparams: dict[str, float], dropout_rate: float,
                    sample: jax.Array | None = None) -> TrainState:
        """A new single-run state: parameters from ``seed``, the optimizer's injected ``hyperparams``
        (``learning_rate``, ``weight_decay``), ``dropout_rate``, and for models with an
        ``init_from_data(params, images)`` method, ``sample`` (uint8 training images) to initialize from.
        One compiled program per :class:`StepFns` (``model.init`` run op by op compiles every primitive)."""
        hyper = {k: jnp.asarray(v, jnp.float32) for k, v in hyperparams.items()}
        return self._fresh(jax.random.PRNGKey(seed), hyper, jnp.asarray(dropout_rate, jnp.float32), sample)

    @functools.cached_property
    def _fresh(self) -> Callable:
        def fresh(key, hyperparams, dropout_rate, sample):
            init_key, rng = jax.random.split(key)
            variables = self.model.init({"params": init_key, "dropout": init_key}, jnp.zeros((1, 32, 32, 3)),
                                        train=False)
            params, batch_stats = variables["params"], variables.get("batch_stats", {})
            if sample is not None and hasattr(self.model, "init_from_data"):
                params = self.model.init_from_data(params, normalize(sample, self.mean, self.std))
            opt_state = reset_lookahead(self.tx.init(params), params, batch_stats)
            opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **hyperparams})
            return TrainState(
                params=params, batch_stats=batch_stats, opt_state=opt_state,
                plateau=self.plateau.init(params) if self.plateau is not None else (),
                step=jnp.zeros((), jnp.int32), rng=rng, dropout_rate=dropout_rate,
                best_params=jax.tree.map(jnp.copy, params), best_batch_stats=jax.tree.map(jnp.copy, batch_stats),
                best_val_accuracy=jnp.asarray(-1.0, jnp.float32),
                best_epoch=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32))

        return jax.jit(fresh)

    def end_epoch(self, state: TrainState, val_loss: jax.Array, val_accuracy: jax.Array) -> TrainState:
        """Close an epoch: keep the weights if ``val_accuracy`` (the selection metric: validation, or
        training without a validation split) improved, step the plateau on ``val_loss``, count the epoch."""
        improved = val_accuracy > state.best_val_accuracy

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(improved, a, b), new, old)

        plateau = state.plateau
        if self.plateau is not None:
            _, plateau = self.plateau.update(jnp.zeros(()), plateau, value=val_loss)
        epoch = state.epoch + 1
        return state.replace(
            best_params=pick(state.params, state.best_params),
            best_batch_stats=pick(state.batch_stats, state.best_batch_stats),
            best_val_accuracy=jnp.maximum(val_accuracy, state.best_val_accuracy),
            best_epoch=jnp.where(improved, epoch, state.best_epoch), epoch=epoch, plateau=plateau)

    def shard_batch(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        """Constrain batch arrays to be split over the devices (data parallelism); a no-op on one device or
        for a batch that does not divide evenly (evaluation's last batch is then replicated)."""
        s = self.batch_sharding
        if s is None or arrays[0].shape[0] % s.mesh.size:
            return arrays
        return tuple(jax.lax.with_sharding_constraint(a, s) for a in arrays)

    def loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        targets = jax.nn.one_hot(labels, self.num_classes)
        if self.label_smoothing:
            targets = optax.smooth_labels(targets, self.label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)

    def train_step(self, state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array):
        images, labels = self.shard_batch(*batch)
        aug_key, drop_key = jax.random.split(key)
        x = normalize(self.augment(aug_key, images), self.mean, self.std, self.compute_dtype)
        has_bn = bool(jax.tree.leaves(state.batch_stats))

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out = self.model.apply(variables, x, train=True, dropout_rate=state.dropout_rate,
                                   rngs={"dropout": drop_key}, mutable=["batch_stats"] if has_bn else False)
            logits, new_vars = out if has_bn else (out, {"batch_stats": state.batch_stats})
            return self.loss(logits, labels).mean(), (logits, new_vars["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        extra = {"batch_stats": batch_stats} if has_bn else {}  # lookahead averages BN statistics too
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, **extra)
        batch_stats = synced_batch_stats(opt_state, batch_stats)
        if state.plateau != ():
            updates = optax.tree.scale(state.plateau.scale, updates)
        state = state.replace(params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
                              opt_state=opt_state, step=state.step + 1)
        accuracy = (logits.argmax(-1) == labels).mean()
        return state, {"loss": loss, "accuracy": accuracy}

    def eval_step(self, variables, images: jax.Array, labels: jax.Array, weight: jax.Array) -> Metrics:
        """Sums over the batch of weighted loss and correct predictions (weight 0 marks padding)."""
        images, labels, weight = self.shard_batch(images, labels, weight)
        logits = self.logits(variables, images)
        return {
            "loss": (self.loss(logits, labels) * weight).sum(),
            "correct": ((logits.argmax(-1) == labels) * weight).sum(),
            "count": weight.sum(),
        }

    def logits(self, variables, images: jax.Array) -> jax.Array:
        """Evaluation-mode logits float32 [N, num_classes] for uint8 images [N, 32, 32, 3], averaged over the
        test-time augmentations: ``tta=1`` the image and its mirror; ``tta=2`` half that, half the mean of
        the same pair shifted one pixel up-left and down-right (reflect padding)."""
        x = normalize(images, self.mean, self.std, self.compute_dtype)

        def mirrored(v):
            out = self.model.apply(variables, v)
            return out if self.tta == 0 else 0.5 * (out + self.model.apply(variables, v[:, :, ::-1]))

        logits = mirrored(x)
        if self.tta >= 2:
            h, w = x.shape[1:3]
            pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
            logits = 0.5 * logits + 0.25 * (mirrored(pad[:, :h, :w]) + mirrored(pad[:, 2:, 2:]))
        return logits

    def probabilities(self, variables, images: jax.Array) -> jax.Array:
        """Softmax class probabilities float32 [N, num_classes] for uint8 images [N, 32, 32, 3] (with the
        configured test-time augmentation)."""
        return jax.nn.softmax(self.logits(variables, images))


def make_chunk_runner(fns: StepFns, unroll: int | bool) -> Callable:
    """``run(state, images, labels, index int32 [K, B]) -> (state, metrics [K])``: K train steps.

    Step keys are ``fold_in(state.rng, state.step)``; ``images``/``labels`` are the whole on-device training
    split and ``index`` picks each step's batch. Every step is real (no padding mask: a where over the state
    on every step cost ~5 % on CPU), so an epoch whose step count is not a multiple of K ends with a shorter
    chunk, which compiles once more.
    """

    def run(state: TrainState, images, labels, index):
        def body(state, idx):
            key = jax.random.fold_in(state.rng, state.step)
            return fns.train_step(state, (images[idx], labels[idx]), key)

        if unroll is True:  # straight-line code: XLA:CPU runs even a length-1 scan as a slow while loop
            metrics = []
            for i in range(index.shape[0]):
                state, m = body(state, index[i])
                metrics.append(m)
            return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)
        return jax.lax.scan(body, state, index, unroll=unroll)

    return run


def make_evaluator(fns: StepFns, use_best: bool = False) -> Callable:
    """``evaluate(state, images, labels, index [S, B], weight [S, B]) -> {'loss', 'accuracy'}`` over the
    whole split as one forward-only ``lax.scan`` (fast on every backend)."""

    def evaluate(state: TrainState, images, labels, index, weight):
        variables = state.best_variables if use_best else state.variables

        def body(carry, xs):
            idx, w = xs
            m = fns.eval_step(variables, images[idx], labels[idx], w)
            return jax.tree.map(jnp.add, carry, m), None

        zero = {"loss": jnp.zeros(()), "correct": jnp.zeros(()), "count": jnp.zeros(())}
        tot, _ = jax.lax.scan(body, zero, (index, weight))
        return {"loss": tot["loss"] / tot["count"], "accuracy": tot["correct"] / tot["count"]}

    return evaluate
