"""Bring your own model, optimizer, loss and metrics into :func:`~jaxcifar.train.fit`.

The protocol each piece follows (checked before anything compiles, with an error that names the fix):

* ``model``: a ``flax.linen.Module`` instance, or a Flax NNX module's constructor (the class, a partial or a
  function taking ``rngs``; :mod:`~jaxcifar.train.nnx_model`), whose ``__call__(x, train: bool)`` maps
  normalized float images [N, 32, 32, 3] to logits [N, num_classes]. ``fit`` always passes ``train``; a
  ``__call__(*args, **kwargs)`` (a wrapper such as ``nnx.bridge.to_linen``) is traced to see what it takes.
  ``train`` switches dropout and batch norm; batch-norm statistics live in the ``batch_stats`` collection
  (``nn.BatchNorm(use_running_average=not train)``; NNX: ``nnx.BatchNorm`` keeps them as ``nnx.BatchStat``),
  dropout draws from the ``dropout`` RNG (NNX: the module's RNG streams, reseeded every step); an NNX module
  keeps no other state. To let ``fit`` set the dropout rate (``config.dropout_rate``, a run axis over
  ``dropout_rate``), ``__call__`` takes an optional ``dropout_rate`` argument; otherwise the module's own
  fields decide it. Name the classifier submodule ``head`` to fine-tune with ``body=``.
* ``tx``: an ``optax.GradientTransformation``, or a factory ``(config, steps_per_epoch) -> tx`` that reads
  the config's optimizer fields. A run axis over ``learning_rate`` / ``weight_decay`` needs them injected as
  numbers: ``optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=5e-4)``.
* ``loss_fn(logits, labels) -> per-example loss [B]``: integer labels int32 [B], or soft targets float
  [B, classes] when mixup/cutmix are on (:func:`~jaxcifar.train.losses.cross_entropy` takes both).
* ``metrics_fn(logits, labels) -> {name: per-example value [B]}``: integer labels; averaged per logging
  interval and per epoch in training, over the validation split each epoch and over the test split at the end.

Compiled programs are cached by the identity of these objects (a module by its class and fields): pass the
same objects to reuse them, and call :func:`~jaxcifar.train.clear_program_cache` after changing a global
that one of your functions reads.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcifar.errors import ConfigError
from jaxcifar.train.config import TrainConfig
from jaxcifar.train.fingerprint import fingerprint
from jaxcifar.train.nnx_model import NnxModel, nnx_model

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
MetricsFn = Callable[[jax.Array, jax.Array], dict[str, jax.Array]]
TxFactory = Callable[[TrainConfig, int], optax.GradientTransformation]

# Config fields that describe the built-in optimizer: a tx object replaces them all.
OPTIMIZER_FIELDS = ("optimizer", "learning_rate", "momentum", "nesterov", "weight_decay", "b1", "b2",
                    "muon_learning_rate", "muon_momentum", "muon_ns_steps", "muon_normalize_weights",
                    "grad_clip_norm", "param_rules", "lookahead_every", "lookahead_decay", "schedule",
                    "warmup_epochs", "step_epochs", "step_factor", "lr_start_factor", "lr_end_factor")
RESERVED_METRICS = ("loss", "accuracy")


@dataclass(frozen=True)
class Components:
    """A user's pieces for ``fit`` (None: the config's named one). See the module docstring for the protocol."""

    model: nn.Module | NnxModel | None = None
    tx: optax.GradientTransformation | TxFactory | None = None
    loss_fn: LossFn | None = None
    metrics_fn: MetricsFn | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", as_model(self.model))  # an NNX constructor behind fit's two calls

    def identity(self) -> tuple:
        """What the compiled programs depend on: the module (its class and fields) and the other objects."""
        return tuple(map(cache_identity, (self.model, self.tx, self.loss_fn, self.metrics_fn)))

    def describe(self) -> dict[str, str | None]:
        """Stable text labels (the same across processes) for results and checkpoints."""
        return {"model": label(self.model), "model_repr": None if self.model is None else repr(self.model),
                "tx": label(self.tx), "loss_fn": label(self.loss_fn), "metrics_fn": label(self.metrics_fn)}

    def fingerprints(self, tx: optax.GradientTransformation, config: TrainConfig) -> dict[str, str | None]:
        """What a checkpoint compares on resume (:mod:`~jaxcifar.train.fingerprint`): the transformation ``tx``
        built from the user's (None for the built-in one, which the config describes), the loss and metric
        functions and the augmentation functions in ``config.augment``."""
        functions = tuple(a for a in config.augment if callable(a))
        return {"tx": fingerprint(tx) if self.tx is not None else None, "loss_fn": fingerprint(self.loss_fn),
                "metrics_fn": fingerprint(self.metrics_fn), "augment": fingerprint(functions) if functions else None}

    def optimizer(self, config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation | None:
        """The user's transformation (a factory called with the config), or None for the built-in one."""
        if self.tx is None or _is_transformation(self.tx):
            return self.tx
        tx = self.tx(config, steps_per_epoch)
        if not _is_transformation(tx):
            raise ConfigError(f"tx factory {label(self.tx)} returned {type(tx).__name__}: it must return an "
                              "optax.GradientTransformation")
        return tx


def recorded_config(config: TrainConfig, components: Components) -> dict[str, Any]:
    """``config`` as results and checkpoints record it: functions by label, and a user's model as
    ``'custom:module.Class'`` (``load_trained(dir, model=...)`` then needs the module)."""
    d = config.to_json_dict()
    if components.model is not None:
        d["model"] = f"custom:{label(components.model)}"
    return d


def as_model(model: Any) -> Any:
    """``model`` as ``fit`` calls it: an NNX module class or constructor wrapped in
    :class:`~jaxcifar.train.nnx_model.NnxModel`, anything else unchanged."""
    return nnx_model(model) or model


def label(obj: Any) -> str | None:
    """``module.qualname`` of a function, class or module instance (of the wrapped function for a partial, of
    the ``init`` function for an optax transformation)."""
    if obj is None:
        return None
    if isinstance(obj, functools.partial):
        return label(obj.func)
    if _is_transformation(obj):
        return label(obj.init)
    if isinstance(obj, NnxModel):
        return label(obj.make)
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


def _is_transformation(obj: Any) -> bool:
    return isinstance(obj, optax.GradientTransformation | optax.GradientTransformationExtraArgs)


class _ById:
    """A cache key part that compares by identity and keeps its object alive (so the id is not reused)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ById) and other.obj is self.obj


def cache_identity(obj: Any) -> tuple:
    """A program-cache key part for ``obj``: its class (by identity) and the object itself. Functions and
    classes compare by identity (the same name defined twice gives two keys), equal modules (same class, same
    fields) give equal keys, unhashable objects compare by identity."""
    try:
        hash(obj)
        part = obj
    except TypeError:
        part = _ById(obj)
    kind = type(obj)
    return (kind.__module__, kind.__qualname__, _ById(kind), part)


def check_components(c: Components, config: TrainConfig, dropout_varies: bool) -> None:
    """Every protocol check that needs no tracing (see the module docstring); raises :class:`ConfigError`."""
    if c.model is not None:
        _check_model_object(c.model, config, dropout_varies)
    if c.tx is not None:
        _check_tx(c.tx, config)
    if c.loss_fn is not None:
        _require(callable(c.loss_fn), f"loss_fn must be a function (logits, labels) -> loss [B], got {c.loss_fn!r}")
        _require(config.label_smoothing == 0, "label_smoothing applies to the built-in loss only: with loss_fn= "
                 "smooth the targets in your loss (e.g. optax.smooth_labels) and drop label_smoothing")
    if c.metrics_fn is not None:
        _require(callable(c.metrics_fn),
                 f"metrics_fn must be a function (logits, labels) -> {{name: value [B]}}, got {c.metrics_fn!r}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _call_parameters(model: nn.Module | NnxModel) -> tuple[set[str], bool]:
    """The names the module's ``__call__`` takes, and whether it takes ``**kwargs`` too."""
    params = inspect.signature(_module_type(model).__call__).parameters
    return set(params), any(p.kind is p.VAR_KEYWORD for p in params.values())


def takes_dropout_rate(model: nn.Module) -> bool:
    """Whether ``model.__call__`` takes a ``dropout_rate`` argument: named in its signature, or, behind
    ``**kwargs`` (e.g. a wrapper such as ``nnx.bridge.to_linen``), accepted when traced (no compilation)."""
    names, var_keyword = _call_parameters(model)
    if "dropout_rate" in names:
        return True
    if not var_keyword:
        return False
    x = jnp.zeros((1, 32, 32, 3))
    try:
        jax.eval_shape(lambda: model.apply(model.init(_init_keys(), x, train=False), x, train=False,
                                           dropout_rate=0.0))
    except TypeError:
        return False
    return True


def _init_keys() -> dict[str, jax.Array]:
    """The RNGs a traced ``init`` takes (built inside the trace)."""
    return {"params": jax.random.key(0), "dropout": jax.random.key(1)}


def _module_type(model: nn.Module | NnxModel) -> type:
    """The user's module class (an NNX module's, behind its constructor)."""
    return model.module_type if isinstance(model, NnxModel) else type(model)


def _check_model_object(model: Any, config: TrainConfig, dropout_varies: bool) -> None:
    if inspect.isclass(model):
        raise ConfigError(f"model must be a module instance, got the class {model.__name__}: pass "
                          f"{model.__name__}(...)")
    _require(isinstance(model, nn.Module | NnxModel), f"model must be a flax.linen.Module instance or an NNX module "
             f"constructor (a class or function taking rngs), got {type(model).__name__}")
    name = _module_type(model).__name__
    names, var_keyword = _call_parameters(model)
    # behind **kwargs, tracing (check_model_outputs) tells whether `train` is taken
    _require("train" in names or var_keyword, f"{name}.__call__ must take `train: bool` (dropout and batch-norm "
             f"mode): def __call__(self, x, train: bool = False)")
    _require(not config.model_kwargs, f"model_kwargs configure a registered model; {name} is given as an object: "
             "set its fields instead and drop model_kwargs")
    if (config.dropout_rate or dropout_varies) and not takes_dropout_rate(model):
        raise ConfigError(f"{name}.__call__ takes no dropout_rate, so config.dropout_rate (or a run axis over it) "
                          "cannot reach it: add `dropout_rate=None` to __call__, or set dropout in the module's "
                          "fields and leave dropout_rate at 0")


def _check_tx(tx: Any, config: TrainConfig) -> None:
    if not _is_transformation(tx):
        _require(callable(tx), f"tx must be an optax.GradientTransformation or a factory (config, steps_per_epoch) "
                 f"-> tx, got {type(tx).__name__}")
        return  # a factory reads the config's optimizer fields itself
    default = TrainConfig()
    changed = [f for f in OPTIMIZER_FIELDS if getattr(config, f) != getattr(default, f)]
    _require(not changed, f"tx= replaces the config's optimizer and schedule, so {changed} would be ignored: build "
             "them into your tx, or pass tx as a factory (config, steps_per_epoch) -> tx that reads them")


def check_model_outputs(model: nn.Module, num_classes: int, dtype: Any) -> None:
    """Trace (no compilation) ``model`` on one image: it must return logits [1, num_classes] and keep no
    variable collections but ``params`` and ``batch_stats``."""
    name = _module_type(model).__name__
    x = jnp.zeros((1, 32, 32, 3), dtype)
    try:
        variables = jax.eval_shape(lambda: model.init(_init_keys(), x, train=False))
        logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} fails on a batch of 32x32x3 images called with train=False "
                          f"({str(e).splitlines()[0]}): it must map [N, 32, 32, 3] to logits [N, classes] and take "
                          "`train: bool`") from e
    other = set(variables) - {"params", "batch_stats"}
    _require(not other, f"{name} keeps variable collections {sorted(other)}: fit trains only 'params' and "
             "'batch_stats'; make them one of these")
    shape = getattr(logits, "shape", None)
    _require(shape == (1, num_classes), f"{name} returns {shape if shape else type(logits).__name__} for one "
             f"image, the data has {num_classes} classes: it must return logits [N, {num_classes}] (set its "
             "number of outputs)")


def check_metrics(values: Any, batch: int, fn: Callable) -> dict[str, jax.Array]:
    """``metrics_fn``'s output, checked while tracing: a dict of per-example values [batch], names not reserved."""
    where = label(fn)
    _require(isinstance(values, dict), f"metrics_fn {where} returned {type(values).__name__}: return "
             "{name: per-example value [B]}")
    for name, v in values.items():
        _require(name not in RESERVED_METRICS, f"metrics_fn {where} returns {name!r}, which fit records itself: "
                 "rename it")
        _require(getattr(v, "shape", None) == (batch,), f"metrics_fn {where}: {name!r} has shape "
                 f"{getattr(v, 'shape', None)}, not per-example [{batch}]: return values per example, fit averages")
    return values


def _has_hyperparams(x: Any) -> bool:
    return isinstance(getattr(x, "hyperparams", None), dict)


def _injecting(opt_state: Any) -> list[Any]:
    """The ``optax.inject_hyperparams`` states inside ``opt_state`` (anywhere in a chain), outermost first."""
    return [s for s in jax.tree.leaves(opt_state, is_leaf=_has_hyperparams) if _has_hyperparams(s)]


def injected(opt_state: Any, name: str) -> jax.Array | None:
    """The current value of the injected hyper-parameter ``name`` (the first found), or None."""
    found = [s.hyperparams[name] for s in _injecting(opt_state) if name in s.hyperparams]
    return found[0] if found else None


def inject(opt_state: Any, hyperparams: dict[str, jax.Array]) -> Any:
    """``opt_state`` with ``hyperparams`` (a run's ``learning_rate`` / ``weight_decay``) set in every
    ``inject_hyperparams`` state that has them; a clear error when none has one, or when it is a schedule
    (recomputed every step, the run's value would be lost)."""
    if not hyperparams:
        return opt_state
    states = _injecting(opt_state)
    for k in hyperparams:
        if not any(k in s.hyperparams for s in states):
            raise ConfigError(f"the runs set {k!r} but the optimizer has no injected {k!r}: build it with "
                              f"optax.inject_hyperparams(...)({k}=...) so fit can set it per run")
        if any(k in getattr(s, "hyperparams_states", {}) for s in states):
            raise ConfigError(f"{k!r} is a schedule in your optimizer, recomputed every step, so a run's value "
                              "would be lost: inject the peak as a number and apply the schedule inside "
                              "(docs/research.md shows how)")

    def set_values(s: Any) -> Any:
        if not _has_hyperparams(s):
            return s
        mine = {k: v for k, v in hyperparams.items() if k in s.hyperparams}
        return s._replace(hyperparams={**s.hyperparams, **mine})

    return jax.tree.map(set_values, opt_state, is_leaf=_has_hyperparams)
