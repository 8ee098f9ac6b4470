"""The training configuration: one small frozen dataclass, validated before anything compiles."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxcifar.data.augment import augment_names
from jaxcifar.errors import ConfigError
from jaxcifar.models import ACTIVATIONS, INITS, MODELS, TORCH_INIT_MODELS

OPTIMIZERS = ("sgd", "adam", "adamw", "muon")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "onecycle", "triangular", "linear")
RULE_KEYS = ("lr_scale", "train_epochs", "schedule_epochs", "muon")
LOOPS = ("auto", "scan", "unrolled")
RUN_STRATEGIES = ("auto", "vmap", "loop")
PARALLEL = ("auto", "data", "runs")
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run. Defaults are the classic CIFAR-10 baseline:
    ConvNet, SGD lr 1e-3 momentum 0.9, batch 32, 20 epochs, 49000/1000 train/validation split."""

    # model
    model: str = "convnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dropout_rate: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters stay float32
    init: str = "flax"  # "torch": PyTorch's default init (kernel and bias U(+-1/sqrt(fan_in))); mlp and convnet
    # optimizer
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0  # coupled (L2 in the gradient) for sgd/adam, decoupled for adamw
    b1: float = 0.9
    b2: float = 0.999
    # "muon": Muon (Nesterov momentum orthogonalized by Newton-Schulz) for every conv kernel, Nesterov-or-not SGD
    # with `momentum` / `weight_decay` for the other parameters (a param rule's "muon" moves one either way)
    muon_learning_rate: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    muon_normalize_weights: bool = False  # rescale each Muon kernel to norm sqrt(fan_out) before its step
    grad_clip_norm: float | None = None
    label_smoothing: float = 0.0
    # Per-parameter rules, first match wins: (regex on the "/"-joined path such as "block0_bn1/bias",
    # {"lr_scale": gradient multiplier, "train_epochs": epochs before the parameter freezes, 0 = never trained,
    #  "schedule_epochs": the learning-rate schedule runs over these epochs for it, "muon": True/False})
    param_rules: tuple = ()
    lookahead_every: int | None = None  # lookahead: pull the weights to a slow average every k steps (None = off)
    lookahead_decay: float = 0.95**5  # the slow average's decay at the end; it ramps up as (step / total)^3
    # schedule
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    step_epochs: tuple[int, ...] = ()  # "step": multiply by step_factor at these epochs
    step_factor: float = 0.1
    lr_start_factor: float = 0.0  # "triangular": lr x this at step 0, linear up to lr at `warmup_epochs`,
    lr_end_factor: float = 0.0  # then linear down to lr x this at the end ("linear": from lr down to lr x this)
    plateau_patience: int | None = None  # reduce-on-plateau of the validation loss (epochs); None = off
    plateau_factor: float = 0.1
    # data
    batch_size: int = 32
    eval_batch_size: int = 1000
    val_size: int | float = 1000
    stratified_split: bool = False
    split_seed: int | None = None  # seed of the train/validation split; None = `seed`
    split_per_run: bool = False  # with fit(runs=...): each run splits off its own validation set (by its seed)
    augment: tuple = ()  # names, (name, kwargs) or functions (key, images) -> images; see jaxcifar.data.make_pipeline
    normalize: bool = True  # standardize inputs by the training split's channel mean/std; False = raw [0, 1]
    tta: int = 0  # test-time augmentation in evaluation: 0 none, 1 mirror, 2 mirror and 1-pixel shifts
    ema_decay: float | None = None  # keep a moving average of the weights (e.g. 0.999), evaluated beside them
    # loop
    epochs: int = 20
    log_every: int = 200  # steps between training-metric log points
    early_stopping_patience: int | None = None  # epochs without a better validation accuracy
    seed: int = 0
    loop: str = "auto"  # "scan": whole epoch in one lax.scan; "unrolled": chunks of `unroll` steps
    unroll: int = 16
    # Several runs (fit(runs=...)): "vmap" batches them; "loop" traces them one after another inside the same
    # compiled program; "auto" = loop on CPU (grouped convolutions are slow there), vmap elsewhere.
    run_strategy: str = "auto"
    runs_per_chunk: int | None = None  # runs compiled and trained together; None = as many as fit in memory
    devices: int | None = None  # use the first N devices (all when None)
    # How several devices share the work: "data" splits every batch (the batch must divide); "runs" shards the
    # run axis of a vmapped sweep (each device trains its own runs; each group's run count must divide);
    # "auto" = "runs" when fit(runs=...) uses the vmap strategy and the run count divides, else "data".
    parallel: str = "auto"
    # checkpoints
    keep_checkpoints: int = 2
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved); raise it when a
    # save takes long against an epoch (a fast GPU): a resume then restarts after the last saved epoch

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (functions in ``augment`` stay functions: see :meth:`to_json_dict`)."""
        return dataclasses.asdict(self)

    def to_json_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with every function in ``augment`` replaced by its label ``'<function module.name>'``,
        for results and checkpoints."""
        d = self.to_dict()
        d["augment"] = tuple(_callable_label(a) if callable(a) else a for a in self.augment)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        for k in ("step_epochs", "augment", "param_rules"):
            if k in d:
                d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in d[k])
        return cls(**d)


def _callable_label(fn: Any) -> str:
    return f"<function {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}>"


def _check(ok: bool, message: str, cli: str | None = None) -> None:
    if not ok:
        raise ConfigError(message, cli=cli)


def validate_config(c: TrainConfig, train_size: int | None = None) -> None:
    """Raise :class:`ConfigError` naming the first invalid field and the fix."""
    _check(c.model in MODELS, f"unknown model {c.model!r}: use one of {sorted(MODELS)}")
    act = c.model_kwargs.get("activation", "relu")
    _check(act in ACTIVATIONS, f"unknown activation {act!r}: use one of {sorted(ACTIVATIONS)}")
    _check(c.init in INITS, f"unknown init {c.init!r}: use one of {list(INITS)}")
    _check(c.init == "flax" or c.model in TORCH_INIT_MODELS, f"init {c.init!r} is available for the models "
           f"{list(TORCH_INIT_MODELS)}, not {c.model!r}: drop init or pick one of those")
    _check(c.optimizer in OPTIMIZERS, f"unknown optimizer {c.optimizer!r}: use one of {list(OPTIMIZERS)}")
    _check(c.schedule in SCHEDULES, f"unknown schedule {c.schedule!r}: use one of {list(SCHEDULES)}")
    _check(c.run_strategy in RUN_STRATEGIES,
           f"unknown run_strategy {c.run_strategy!r}: use one of {list(RUN_STRATEGIES)}")
    _check(c.runs_per_chunk is None or c.runs_per_chunk >= 1, "runs_per_chunk must be >= 1 or None")
    _check(c.parallel in PARALLEL, f"unknown parallel mode {c.parallel!r}: use one of {list(PARALLEL)}")
    _check(c.devices is None or c.devices >= 1, f"devices {c.devices} must be >= 1 or None (all devices)")
    _check(c.loop in LOOPS, f"unknown loop {c.loop!r}: use one of {list(LOOPS)}")
    _check(c.dtype in DTYPES, f"unknown dtype {c.dtype!r}: use one of {list(DTYPES)}")
    _check(0.0 <= c.dropout_rate < 1.0, f"dropout rate {c.dropout_rate} must be in [0, 1): e.g. 0.5")
    _check(math.isfinite(c.learning_rate) and c.learning_rate > 0,
           f"learning rate {c.learning_rate} must be > 0: e.g. 1e-3")
    _check(c.weight_decay >= 0, f"weight decay {c.weight_decay} must be >= 0")
    _check(0.0 <= c.momentum < 1.0, f"momentum {c.momentum} must be in [0, 1)")
    _check(math.isfinite(c.muon_learning_rate) and c.muon_learning_rate > 0,
           f"muon_learning_rate {c.muon_learning_rate} must be > 0: e.g. 0.02")
    _check(0.0 <= c.muon_momentum < 1.0, f"muon_momentum {c.muon_momentum} must be in [0, 1)")
    _check(_is_int(c.muon_ns_steps) and c.muon_ns_steps >= 1, f"muon_ns_steps {c.muon_ns_steps!r} must be an "
           "integer >= 1: e.g. 5")
    _check(0.0 <= c.b1 < 1.0 and 0.0 <= c.b2 < 1.0, f"Adam's b1 {c.b1} and b2 {c.b2} must be in [0, 1): e.g. "
           "0.9 and 0.999")
    for name in ("seed", "split_seed"):
        value = getattr(c, name)
        _check(value is None or valid_seed(value), f"{name} {value!r} must be an integer in [0, 2**32): e.g. 0")
    problem = f"val_size {c.val_size!r} must be a count (0, 1000, ...) or a fraction in (0, 1): e.g. "
    _check(valid_val_size(c.val_size), problem + "val_size=5000 or 0.1", cli=problem + "--val-size 5000 or 0.1")
    _check(0.0 <= c.label_smoothing < 1.0, f"label smoothing {c.label_smoothing} must be in [0, 1)")
    _check(c.grad_clip_norm is None or c.grad_clip_norm > 0, "grad_clip_norm must be > 0 or None")
    _check(c.epochs >= 1, f"epochs {c.epochs} must be >= 1")
    _check(c.batch_size >= 1, f"batch size {c.batch_size} must be >= 1")
    _check(c.eval_batch_size >= 1, f"eval batch size {c.eval_batch_size} must be >= 1")
    _check(c.log_every >= 1, f"log_every {c.log_every} must be >= 1")
    _check(c.unroll >= 1, f"unroll {c.unroll} must be >= 1")
    _check(c.warmup_epochs >= 0, f"warmup_epochs {c.warmup_epochs} must be >= 0")
    _check(c.plateau_patience is None or c.plateau_patience >= 1, "plateau_patience must be >= 1 or None")
    _check(0 < c.plateau_factor < 1, f"plateau_factor {c.plateau_factor} must be in (0, 1)")
    _check(c.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    _check(c.checkpoint_every >= 1, f"checkpoint_every {c.checkpoint_every} must be >= 1 (epochs between saves)")
    _check(c.tta in (0, 1, 2), f"tta {c.tta} must be 0 (none), 1 (mirror) or 2 (mirror and shifts)")
    _check(c.lookahead_every is None or c.lookahead_every >= 1, "lookahead_every must be >= 1 or None")
    _check(0.0 <= c.lookahead_decay < 1.0, f"lookahead_decay {c.lookahead_decay} must be in [0, 1)")
    _check(c.plateau_patience is None or c.lookahead_every is None,
           "plateau_patience and lookahead_every cannot be combined (the plateau scale would also shrink "
           "lookahead's sync step): use a schedule with lookahead, or drop lookahead_every")
    _check(c.lr_start_factor >= 0 and c.lr_end_factor >= 0, "lr_start_factor and lr_end_factor must be >= 0")
    for rule in c.param_rules:
        _check_rule(rule)
    _check(c.ema_decay is None or 0.0 < c.ema_decay < 1.0, f"ema_decay {c.ema_decay} must be in (0, 1) or None: "
           "e.g. 0.999")
    for item in c.augment:
        _check_augment_item(item)
    if train_size is not None:
        problem = f"batch size {c.batch_size} is larger than the training split ({train_size}): lower "
        _check(c.batch_size <= train_size, problem + "batch_size", cli=problem + "--batch-size")


def _is_int(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def valid_seed(v: Any) -> bool:
    """An integer in [0, 2**32) (what both JAX's and NumPy's seeding take)."""
    return _is_int(v) and 0 <= v < 2**32


def valid_val_size(v: Any) -> bool:
    """A count (an integer >= 0; a float with an integer value counts) or a fraction in (0, 1)."""
    if _is_int(v):
        return v >= 0
    if not isinstance(v, float) or not math.isfinite(v):
        return False
    return (v.is_integer() and v >= 0) or 0.0 < v < 1.0


def _check_augment_item(item: Any) -> None:
    if callable(item):
        return
    if isinstance(item, str) and item.startswith("<function "):
        raise ConfigError(f"augmentation {item} is a function recorded by name: pass the function itself")
    ok = isinstance(item, str) or (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], dict))
    _check(ok, f"augmentation {item!r} must be a name, (name, {{kwargs}}) or a function (key, images) -> images")
    name = item if isinstance(item, str) else item[0]
    _check(name in augment_names(), f"unknown augmentation {name!r}: use one of {augment_names()}, or pass a "
           "function (key, images) -> images")


def _check_rule(rule: Any) -> None:
    ok = isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str) and isinstance(rule[1], dict)
    _check(ok, f"param rule {rule!r} must be (regex, {{'lr_scale': x, 'train_epochs': n}})")
    try:
        re.compile(rule[0])
    except re.error as e:
        raise ConfigError(f"param rule pattern {rule[0]!r} is not a regular expression ({e}): fix the pattern") from e
    unknown = set(rule[1]) - set(RULE_KEYS)
    _check(not unknown, f"param rule {rule[0]!r} has unknown keys {sorted(unknown)}: use {list(RULE_KEYS)}")
    _check(rule[1].get("lr_scale", 1.0) >= 0, f"param rule {rule[0]!r}: lr_scale must be >= 0")
    _check(rule[1].get("train_epochs", 0) >= 0, f"param rule {rule[0]!r}: train_epochs must be >= 0")
    _check(rule[1].get("schedule_epochs", 1) > 0, f"param rule {rule[0]!r}: schedule_epochs must be > 0")
    _check(isinstance(rule[1].get("muon", False), bool), f"param rule {rule[0]!r}: muon must be True or False")
