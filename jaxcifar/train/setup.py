"""Setting up a training run: data on the device, the step functions and optimizer for a config, and a
fresh (or fine-tuning) single-run state. Used by :func:`~jaxcifar.train.fit` and by code that drives the
compiled pieces itself (benchmarks, :func:`~jaxcifar.train.predict.load_trained`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxcifar.data import Dataset, Split, channel_stats, make_pipeline, train_val_split
from jaxcifar.data.batching import steps_per_epoch
from jaxcifar.data.split import split_indices, validation_count
from jaxcifar.models import BUILTIN_MODELS, MODELS, create_model
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.components import Components, check_model_outputs, takes_dropout_rate
from jaxcifar.train.config import TrainConfig
from jaxcifar.train.losses import cross_entropy
from jaxcifar.train.optim import make_optimizer, make_plateau, reset_lookahead, unit_schedule
from jaxcifar.train.parallel import batch_sharding
from jaxcifar.train.state import TrainState
from jaxcifar.train.steps import StepFns


@dataclass(frozen=True)
class PreparedData:
    """The training, validation and test splits as device arrays, with normalization statistics."""

    train: tuple[jax.Array, jax.Array]
    val: tuple[jax.Array, jax.Array] | None
    test: tuple[jax.Array, jax.Array]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    # > 0: every run draws its own split of this many validation examples from ``train`` (then the whole
    # training set; ``val`` is the same arrays), seeded by the run's seed (:func:`run_splits`)
    per_run_val: int = 0
    stratified: bool = False

    @property
    def train_size(self) -> int:
        """Training examples per run."""
        return int(self.train[1].shape[0]) - self.per_run_val


def prepare_data(dataset: Dataset, config: TrainConfig, per_run_split: bool = False) -> PreparedData:
    """Split off validation (seeded by ``config.split_seed``, else ``config.seed``; shared by all vmapped
    runs), compute the training split's channel mean/std (zeros/ones when ``config.normalize`` is False: raw
    [0, 1] input), and put every split on the device as uint8 images and int32 labels. With
    ``per_run_split`` the whole training set goes to the device and each run splits it itself (statistics
    then come from the whole training set)."""
    train: Split = dataset.train
    val: Split | None = None
    split_seed = config.seed if config.split_seed is None else config.split_seed
    if per_run_split and config.val_size:
        images, labels = _put(train)
        return PreparedData((images, labels), (images, labels), _put(dataset.test), *_input_stats(train, config),
                            dataset.num_classes, validation_count(len(train), config.val_size),
                            config.stratified_split)
    if config.val_size:
        train, val = train_val_split(dataset.train, config.val_size, split_seed, stratified=config.stratified_split)
    return PreparedData(_put(train), _put(val), _put(dataset.test), *_input_stats(train, config),
                        dataset.num_classes)


def _input_stats(train: Split, config: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel of ``train``'s images, or zeros/ones when ``config.normalize`` is False."""
    mean, std = channel_stats(train.images) if config.normalize else (np.zeros(3), np.ones(3))
    return tuple(map(float, mean)), tuple(map(float, std))


def _put(s: Split | None) -> tuple[jax.Array, jax.Array] | None:
    return None if s is None else (jax.device_put(s.images), jax.device_put(s.labels.astype(np.int32)))


def run_splits(data: PreparedData, seeds: Sequence[int]) -> tuple[jax.Array, jax.Array] | None:
    """Per-run ``(train index int32 [R, train_size], validation index int32 [R, per_run_val])`` into
    ``data.train``, run r split by ``split_indices`` with its seed; None when the runs share one split."""
    if not data.per_run_val:
        return None
    labels = np.asarray(jax.device_get(data.train[1]))
    pairs = [split_indices(jax.random.key(s), labels, data.per_run_val, stratified=data.stratified) for s in seeds]
    return jnp.stack([t for t, _ in pairs]), jnp.stack([v for _, v in pairs])


def build(config: TrainConfig, data: PreparedData, mesh: Mesh | None = None,
          components: Components | None = None) -> StepFns:
    """The step functions (model, optimizer, plateau, augmentation, loss, input statistics) for ``config`` on
    ``data``, with the user's ``components`` in place of the config's named ones; with a multi-device ``mesh``
    the steps split each batch over it."""
    return build_for(config, data.mean, data.std, data.num_classes, data.train_size, mesh, components)


def build_for(config: TrainConfig, mean: Sequence[float], std: Sequence[float], num_classes: int,
              train_size: int, mesh: Mesh | None = None, components: Components | None = None) -> StepFns:
    """:func:`build` from the figures it needs (e.g. those a checkpoint records) instead of the data."""
    c = components or Components()
    dtype = jnp.dtype(config.dtype)
    init = {} if config.init == "flax" else {"weight_init": config.init}
    model = c.model or create_model(config.model, num_classes, dtype=dtype, **init, **config.model_kwargs)
    if c.model is not None or MODELS[config.model] is not BUILTIN_MODELS.get(config.model):  # a user's: check it
        check_model_outputs(model, num_classes, dtype)
    spe = steps_per_epoch(train_size, config.batch_size)
    tx = c.optimizer(config, spe)
    augment, mix = make_pipeline(config.augment)
    return StepFns(
        model=model, tx=tx or make_optimizer(config, spe), augment=augment, mix=mix,
        mean=jnp.asarray(mean, jnp.float32), std=jnp.asarray(std, jnp.float32), num_classes=num_classes,
        compute_dtype=dtype, loss_fn=c.loss_fn or functools.partial(cross_entropy,
                                                                      label_smoothing=config.label_smoothing),
        metrics_fn=c.metrics_fn, batch_sharding=batch_sharding(mesh) if mesh is not None and mesh.size > 1 else None,
        tta=config.tta, plateau=make_plateau(config), schedule=unit_schedule(config, spe) if tx is None else None,
        dropout_arg=takes_dropout_rate(model), ema_decay=config.ema_decay)


INIT_SAMPLE = 5000  # training images a data-dependent initialization looks at
HYPERPARAMS = ("learning_rate", "weight_decay")  # injected into the optimizer state: they can vary per run


def init_state(config: TrainConfig, fns: StepFns, run: dict[str, Any] | None = None,
               train_images: jax.Array | None = None) -> TrainState:
    """A fresh single-run state; ``run`` overrides ``seed``, ``dropout_rate``, ``learning_rate``,
    ``weight_decay``. Models with an ``init_from_data(params, images)`` method (e.g. the speedrun net's
    patch-whitening layer) are initialized from the first :data:`INIT_SAMPLE` of ``train_images`` (uint8
    [N, 32, 32, 3]), normalized as in training."""
    run = run or {}
    if fns.builtin_tx:
        hyper = {k: run.get(k, getattr(config, k)) for k in HYPERPARAMS}
    else:  # a user's optimizer keeps its own values unless the run sets them
        hyper = {k: run[k] for k in HYPERPARAMS if k in run}
    sample = None
    if train_images is not None and hasattr(fns.model, "init_from_data"):
        sample = train_images[:INIT_SAMPLE]
    return fns.fresh_state(int(run.get("seed", config.seed)), hyper, run.get("dropout_rate", config.dropout_rate),
                           sample)


def with_body(state: TrainState, body: dict[str, Any]) -> TrainState:
    """``state`` fine-tuning from ``body`` (trained ``{"params", "batch_stats"}``): every module but the
    classifier ``head`` is taken from it, the best-so-far copies and lookahead's slow copies follow."""
    params = ckpt.load_body(state.params, body["params"])
    stats = ckpt.load_body(state.batch_stats, body.get("batch_stats", {})) if state.batch_stats else {}
    fresh = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (own buffers: the state is donated)
    return state.replace(params=fresh(params), batch_stats=fresh(stats), best_params=fresh(params),
                         best_batch_stats=fresh(stats), opt_state=reset_lookahead(state.opt_state, params, stats))
