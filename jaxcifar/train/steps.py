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
from jaxcifar.data.mix import MixFn
from jaxcifar.data.stats import normalize
from jaxcifar.errors import ConfigError
from jaxcifar.train.components import LossFn, MetricsFn, check_metrics, inject, injected, label
from jaxcifar.train.losses import targets_of
from jaxcifar.train.optim import reset_lookahead, synced_batch_stats
from jaxcifar.train.state import TrainState

Metrics = dict[str, jax.Array]


@dataclass(frozen=True)
class StepFns:
    """The static pieces a step closes over: the model, the optimizer ``tx``, the once-per-epoch ``plateau``
    transform (or None), the augmentation (image ops on uint8, then the optional label-mixing ``mix`` on the
    normalized batch), input statistics, the per-example ``loss_fn``, extra ``metrics_fn``, the compute dtype
    and the weight average's ``ema_decay``. Every method is a pure function of its arguments."""

    model: nn.Module
    tx: optax.GradientTransformation
    augment: AugmentFn
    mean: Any  # float32 [3]
    std: Any  # float32 [3]
    num_classes: int
    compute_dtype: Any
    loss_fn: LossFn
    mix: MixFn | None = None  # mixup / cutmix: (key, images, soft targets) -> (images, soft targets)
    metrics_fn: MetricsFn | None = None  # (logits, labels) -> {name: per-example value}
    batch_sharding: Any = None  # NamedSharding of a batch over the data-parallel mesh; None on one device
    tta: int = 0  # test-time augmentation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts
    plateau: optax.GradientTransformationExtraArgs | None = None  # reduce-on-plateau, stepped per epoch
    schedule: Callable | None = None  # the built-in optimizer's unit-peak schedule; None for a user's tx
    dropout_arg: bool = True  # the model's __call__ takes dropout_rate
    ema_decay: float | None = None  # exponential moving average of the weights (None: none)

    @property
    def builtin_tx(self) -> bool:
        """Whether ``tx`` is the config's optimizer (it takes ``batch_stats`` for lookahead)."""
        return self.schedule is not None

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
            opt_state = inject(reset_lookahead(self.tx.init(params), params, batch_stats), hyperparams)
            copy = functools.partial(jax.tree.map, jnp.copy)
            return TrainState(
                params=params, batch_stats=batch_stats, opt_state=opt_state,
                plateau=self.plateau.init(params) if self.plateau is not None else (),
                step=jnp.zeros((), jnp.int32), rng=rng, dropout_rate=dropout_rate,
                best_params=copy(params), best_batch_stats=copy(batch_stats),
                best_val_accuracy=jnp.asarray(-1.0, jnp.float32),
                best_epoch=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
                ema=copy({"params": params, "batch_stats": batch_stats}) if self.ema_decay else (),
                diverged_at=jnp.zeros((), jnp.int32))

        return jax.jit(fresh)

    def current_lr(self, state: TrainState) -> jax.Array:
        """The learning rate of the next step: the injected one (times the built-in schedule and the plateau
        scale); NaN when a user's optimizer injects none."""
        lr = injected(state.opt_state, "learning_rate")
        if lr is None:
            return jnp.full((), jnp.nan, jnp.float32)
        if self.schedule is not None:
            lr = lr * self.schedule(state.step)
        if state.plateau != ():
            lr = lr * state.plateau.scale
        return lr

    def end_epoch(self, state: TrainState, val_loss: jax.Array, val_accuracy: jax.Array) -> TrainState:
        """Close an epoch: keep the weights if ``val_accuracy`` (the selection metric: validation, or
        training without a validation split) improved, step the plateau on ``val_loss``, count the epoch. A
        NaN/inf ``val_loss`` (the caller passes NaN for a run whose training loss was) marks the run diverged."""
        epoch = state.epoch + 1
        # a NaN/inf validation loss marks a run diverged too; a diverged run's frozen weights are never "best"
        diverged_at = jnp.where((state.diverged_at == 0) & ~jnp.isfinite(val_loss), epoch, state.diverged_at)
        improved = (val_accuracy > state.best_val_accuracy) & (diverged_at == 0)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(improved, a, b), new, old)

        plateau = state.plateau
        if self.plateau is not None:
            _, plateau = self.plateau.update(jnp.zeros(()), plateau, value=val_loss)
        return state.replace(
            best_params=pick(state.params, state.best_params),
            best_batch_stats=pick(state.batch_stats, state.best_batch_stats),
            best_val_accuracy=jnp.where(improved, val_accuracy, state.best_val_accuracy),
            best_epoch=jnp.where(improved, epoch, state.best_epoch), epoch=epoch, plateau=plateau,
            diverged_at=diverged_at)

    def shard_batch(self, *arrays: jax.Array) -> tuple[jax.Array, ...]:
        """Constrain batch arrays to be split over the devices (data parallelism); a no-op on one device or
        for a batch that does not divide evenly (evaluation's last batch is then replicated)."""
        s = self.batch_sharding
        if s is None or arrays[0].shape[0] % s.mesh.size:
            return arrays
        return tuple(jax.lax.with_sharding_constraint(a, s) for a in arrays)

    def train_step(self, state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array,
                   freeze_diverged: bool = False):
        """One optimizer step. With ``freeze_diverged`` (sweeps: a run axis) a step whose loss is NaN/inf records
        its epoch in ``diverged_at``, and it and every later step leave the run's weights as they are, so the
        other runs of the sweep go on. A single run is checked at the epoch's end instead (and stops): the
        per-parameter selects cost ~1.3 s of compile time per ConvNet program on CPU."""
        images, labels = self.shard_batch(*batch)
        aug_key, drop_key = jax.random.split(key)
        x = normalize(self.augment(aug_key, images), self.mean, self.std, self.compute_dtype)
        targets = labels
        if self.mix is not None:  # soft targets: one-hot labels mixed like the images
            x, targets = self.mix(aug_key, x, targets_of(labels, self.num_classes))
        has_bn = bool(jax.tree.leaves(state.batch_stats))
        extra_args = {"dropout_rate": state.dropout_rate} if self.dropout_arg else {}

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            out = self.model.apply(variables, x, train=True, rngs={"dropout": drop_key},
                                   mutable=["batch_stats"] if has_bn else False, **extra_args)
            logits, new_vars = out if has_bn else (out, {"batch_stats": state.batch_stats})
            return self.per_example_loss(logits, targets).mean(), (logits, new_vars["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        extra = {"batch_stats": batch_stats} if has_bn and self.builtin_tx else {}  # lookahead averages them too
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params, **extra)
        batch_stats = synced_batch_stats(opt_state, batch_stats)
        if state.plateau != ():
            updates = optax.tree.scale(state.plateau.scale, updates)
        diverged_at = state.diverged_at
        if freeze_diverged:
            # Only the loss is checked: a check of every update (a norm over all of them) cost ~12 % of a ConvNet
            # step on CPU, as it keeps XLA from fusing each parameter's update with its optimizer arithmetic.
            finite = jnp.isfinite(loss)
            ok = finite & (diverged_at == 0)
            params = jax.tree.map(lambda p, u: jnp.where(ok, (p + u).astype(p.dtype), p), state.params, updates)
            batch_stats = jax.tree.map(lambda new, old: jnp.where(ok, new, old), batch_stats, state.batch_stats)
            diverged_at = jnp.where((diverged_at == 0) & ~finite, state.epoch + 1, diverged_at)
        else:
            params = optax.apply_updates(state.params, updates)
        state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1,
                              ema=self._ema_update(state.ema, params, batch_stats, state.step),
                              diverged_at=diverged_at)
        metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == labels).mean()}
        return state, {**metrics, **jax.tree.map(jnp.mean, self.extra_metrics(logits, labels))}

    def _ema_update(self, ema: Any, params: Any, batch_stats: Any, step: jax.Array) -> Any:
        """The weight average after a step: ``d * ema + (1 - d) * new`` with ``d = min(ema_decay,
        (1 + step) / (10 + step))``, so the first steps' weights do not linger (TensorFlow's ``num_updates``)."""
        if not self.ema_decay:
            return ema
        step = step.astype(jnp.float32)
        d = jnp.minimum(self.ema_decay, (1.0 + step) / (10.0 + step))
        new = {"params": params, "batch_stats": batch_stats}
        return jax.tree.map(lambda e, x: (d * e + (1.0 - d) * x).astype(e.dtype), ema, new)

    def per_example_loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """``loss_fn``'s per-example loss float32 [B], checked while tracing."""
        loss = self.loss_fn(logits, labels)
        if getattr(loss, "shape", None) != logits.shape[:1]:
            raise ConfigError(f"loss_fn {label(self.loss_fn)} returned shape {getattr(loss, 'shape', None)}, "
                              f"not per-example [{logits.shape[0]}]: return the loss of each example, fit averages")
        return loss.astype(jnp.float32)

    def extra_metrics(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        """``metrics_fn``'s per-example values ({} without one)."""
        if self.metrics_fn is None:
            return {}
        return check_metrics(self.metrics_fn(logits, labels), logits.shape[0], self.metrics_fn)

    def eval_step(self, variables, images: jax.Array, labels: jax.Array, weight: jax.Array) -> Metrics:
        """Sums over the batch of weighted loss, correct predictions and extra metrics (weight 0 marks
        padding), and the weight ``count``."""
        images, labels, weight = self.shard_batch(images, labels, weight)
        logits = self.logits(variables, images)
        per_example = {"loss": self.per_example_loss(logits, labels), "correct": logits.argmax(-1) == labels,
                       **self.extra_metrics(logits, labels)}
        sums = {k: (v * weight).sum() for k, v in per_example.items()}
        return {**sums, "count": weight.sum()}

    def logits(self, variables, images: jax.Array) -> jax.Array:
        """Evaluation-mode logits float32 [N, num_classes] for uint8 images [N, 32, 32, 3], averaged over the
        test-time augmentations: ``tta=1`` the image and its mirror; ``tta=2`` half that, half the mean of
        the same pair shifted one pixel up-left and down-right (reflect padding)."""
        x = normalize(images, self.mean, self.std, self.compute_dtype)

        def mirrored(v):
            # train=False said explicitly: a module written flax-examples style defaults `train` to True
            out = self.model.apply(variables, v, train=False)
            return out if self.tta == 0 else 0.5 * (out + self.model.apply(variables, v[:, :, ::-1], train=False))

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


def make_chunk_runner(fns: StepFns, unroll: int | bool, freeze_diverged: bool = False) -> Callable:
    """``run(state, images, labels, index int32 [K, B]) -> (state, metrics [K])``: K train steps.

    Step keys are ``fold_in(state.rng, state.step)``; ``images``/``labels`` are the whole on-device training
    split and ``index`` picks each step's batch. Every step is real (no padding mask: a where over the state
    on every step cost ~5 % on CPU), so an epoch whose step count is not a multiple of K ends with a shorter
    chunk, which compiles once more.
    """

    def run(state: TrainState, images, labels, index):
        def body(state, idx):
            key = jax.random.fold_in(state.rng, state.step)
            return fns.train_step(state, (images[idx], labels[idx]), key, freeze_diverged)

        if unroll is True:  # straight-line code: XLA:CPU runs even a length-1 scan as a slow while loop
            metrics = []
            for i in range(index.shape[0]):
                state, m = body(state, index[i])
                metrics.append(m)
            return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)
        return jax.lax.scan(body, state, index, unroll=unroll)

    return run


def make_evaluator(fns: StepFns) -> Callable:
    """``evaluate(variables, images, labels, index [S, B], weight [S, B]) -> {'loss', 'accuracy', extra
    metrics}`` over the whole split as one forward-only ``lax.scan`` (fast on every backend); ``variables`` are
    a state's ``weights('current' | 'best' | 'ema')``."""

    def evaluate(variables: dict[str, Any], images, labels, index, weight):
        def body(carry, xs):
            idx, w = xs
            m = fns.eval_step(variables, images[idx], labels[idx], w)
            return jax.tree.map(jnp.add, carry, m), None

        shapes = jax.eval_shape(fns.eval_step, variables, images[index[0]], labels[index[0]], weight[0])
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        tot, _ = jax.lax.scan(body, zero, (index, weight))
        count = tot.pop("count")
        means = {k: v / count for k, v in tot.items()}
        means["accuracy"] = means.pop("correct")
        return means

    return evaluate
