"""Optimizers and learning-rate schedules from optax.

The peak learning rate and weight decay are injected hyper-parameters (``optax.inject_hyperparams``):
they live in the optimizer state as arrays, so ``jax.vmap`` over states trains runs with different
values in one program. Schedules are unit-peak multipliers of that learning rate.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcifar.errors import ConfigError
from jaxcifar.train import muon
from jaxcifar.train.config import TrainConfig

# schedules laid out over the whole training: their learning rate at a step depends on `epochs`
EPOCH_SCHEDULES = ("cosine", "warmup_cosine", "onecycle", "triangular", "linear")


def depends_on_epochs(c: TrainConfig) -> bool:
    """Whether the built-in optimizer of ``c`` changes with ``c.epochs`` (its schedule, or lookahead's ramp)."""
    return c.schedule in EPOCH_SCHEDULES or c.lookahead_every is not None


def unit_schedule(c: TrainConfig, steps_per_epoch: int,
                  epochs: float | None = None) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Multiplier of the peak learning rate as a function of the step (peak 1), over ``epochs`` (the
    config's when None; a param rule's ``schedule_epochs`` gives one group a shorter schedule)."""
    total = max(1, round((c.epochs if epochs is None else epochs) * steps_per_epoch))
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
    elif c.schedule == "triangular":  # linear up to the peak at warmup_epochs, then linear down
        peak = min(max(1, warmup), total - 1) if total > 1 else 1
        base = optax.join_schedules([optax.linear_schedule(c.lr_start_factor, 1.0, peak),
                                     optax.linear_schedule(1.0, c.lr_end_factor, max(1, total - peak))], [peak])
        warmup = 0
    elif c.schedule == "linear":  # airbench94_muon's decay: 1 at step 0, lr_end_factor at the end
        base = optax.linear_schedule(1.0, c.lr_end_factor, total)
    else:  # "onecycle"
        base = optax.cosine_onecycle_schedule(total, 1.0)
    if warmup and c.schedule in ("constant", "step", "cosine", "linear"):
        return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), base], [warmup])
    return base


def make_optimizer(c: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation for ``c``; hyper-parameters ``learning_rate`` and ``weight_decay``
    are injected (see module docstring)."""
    def factory(learning_rate, weight_decay):
        parts = [scale_gradients_by_path(c.param_rules)] if c.param_rules else []
        if c.grad_clip_norm:
            parts.append(optax.clip_by_global_norm(c.grad_clip_norm))
        parts.extend(_descent(c, learning_rate, weight_decay, steps_per_epoch))
        if any("train_epochs" in r[1] for r in c.param_rules):
            parts.append(freeze_by_path(c.param_rules, steps_per_epoch))
        if c.lookahead_every:
            parts.append(lookahead(c.lookahead_every, c.lookahead_decay, max(1, c.epochs * steps_per_epoch)))
        return optax.chain(*parts)

    return optax.inject_hyperparams(factory)(learning_rate=c.learning_rate, weight_decay=c.weight_decay)


BASE = "base"  # the label of the parameters that the config's optimizer (not Muon) updates


def _descent(c: TrainConfig, learning_rate, weight_decay, steps_per_epoch: int) -> list:
    """The optimizer proper, as transformations to chain. The same for all parameters; or, when parameters
    differ in their optimizer (Muon) or in their schedule's length, one per group through
    ``optax.multi_transform``."""
    labels = group_labels(c)
    if labels == (BASE,):
        return _base_optimizer(c, _scheduled(learning_rate, unit_schedule(c, steps_per_epoch)), weight_decay)
    transforms = {}
    for label in labels:
        kind, epochs = _parse_label(label)
        lr = _scheduled(c.muon_learning_rate if kind == "muon" else learning_rate,
                        unit_schedule(c, steps_per_epoch, epochs))
        if kind == "muon":
            transforms[label] = muon.muon(lr, c.muon_momentum, c.muon_ns_steps, c.muon_normalize_weights)
        else:
            transforms[label] = optax.chain(*_base_optimizer(c, lr, weight_decay))
    return [optax.multi_transform(transforms, lambda params: parameter_labels(c, params))]


def _scheduled(peak, schedule: Callable) -> Callable:
    """The learning rate at a step: ``peak`` (a number or an injected array) times the unit ``schedule``."""
    return lambda count: peak * schedule(count)


def _base_optimizer(c: TrainConfig, lr: Callable, weight_decay) -> list:
    """The config's optimizer for one group, as transformations to chain: AdamW (decoupled decay), or the
    decay added to the gradient (PyTorch's coupled L2) followed by SGD (also the non-Muon part of ``"muon"``)
    or Adam. (A flat list keeps the optimizer state of single-group configs as it has always been.)"""
    if c.optimizer == "adamw":
        return [optax.adamw(lr, c.b1, c.b2, weight_decay=weight_decay)]
    if c.optimizer == "adam":
        step = optax.adam(lr, c.b1, c.b2)
    else:
        step = optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov)
    return [optax.add_decayed_weights(weight_decay), step]


def group_labels(c: TrainConfig) -> tuple[str, ...]:
    """Every parameter group ``c`` can form: the base optimizer and (with ``optimizer="muon"`` or a rule's
    ``"muon": True``) Muon, each at the full schedule and at each rule's ``schedule_epochs``."""
    rules = [options for _, options in c.param_rules]
    kinds = [BASE]
    if c.optimizer == "muon" or any(options.get("muon") for options in rules):
        kinds.append("muon")
    lengths = [None] + sorted({options["schedule_epochs"] for options in rules if "schedule_epochs" in options})
    return tuple(_label(kind, epochs) for kind in kinds for epochs in lengths)


def _label(kind: str, epochs: float | None) -> str:
    return kind if epochs is None else f"{kind}@{float(epochs)!r}"


def _parse_label(label: str) -> tuple[str, float | None]:
    kind, _, epochs = label.partition("@")
    return kind, (float(epochs) if epochs else None)


def parameter_labels(c: TrainConfig, params: Any) -> Any:
    """A tree like ``params`` naming each parameter's group (see :func:`group_labels`): Muon for every kernel
    of rank 4 (convolutions) when ``optimizer="muon"``, or wherever a rule says ``"muon": True``; the
    first matching rule's ``schedule_epochs`` picks the schedule's length."""
    rule_for = _rule_lookup(c.param_rules, params)

    def label(path, x):
        options = rule_for(path)
        wanted = options.get("muon", "auto")
        is_muon = (c.optimizer == "muon" and x.ndim == 4) if wanted == "auto" else wanted
        name = path_name(path)
        if is_muon and x.ndim < 2:
            raise ConfigError(f"param rule asks Muon for {name} of shape {x.shape}: Muon needs a kernel of rank "
                              ">= 2; drop 'muon': True for it")
        if is_muon and options.get("lr_scale", 1.0) != 1.0:
            raise ConfigError(f"param rule gives Muon's {name} an lr_scale, which Muon's orthogonalization "
                              "undoes: set muon_learning_rate instead")
        return _label("muon" if is_muon else BASE, options.get("schedule_epochs") or None)

    return jax.tree_util.tree_map_with_path(label, params)


def parameter_groups(c: TrainConfig, params: Any) -> dict[str, list[str]]:
    """Each group's parameter names (``'block0_conv1/kernel'``, ...), for reports and tests."""
    groups: dict[str, list[str]] = {label: [] for label in group_labels(c)}
    labels = parameter_labels(c, params)
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        groups[label].append(path_name(path))
    return groups


def make_plateau(c: TrainConfig) -> optax.GradientTransformationExtraArgs | None:
    """Reduce-on-plateau of the validation loss, stepped once per epoch; ``None`` when off."""
    if c.plateau_patience is None:
        return None
    return optax.contrib.reduce_on_plateau(factor=c.plateau_factor, patience=c.plateau_patience)


def path_name(path: tuple) -> str:
    """The "/"-joined names of a pytree key path, e.g. ``'block0_bn1/bias'`` (the speedrun net's first block's
    second batch norm) or ``'head/kernel'``."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _rule_lookup(rules, params) -> Callable[[tuple], dict[str, Any]]:
    """``rule_for(path)``: the options of the first rule whose regex fully matches a parameter's path (``{}``
    when none does), after checking that every rule matches some parameter of ``params``."""
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern, _ in rules:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise ConfigError(f"param rule {pattern!r} matches no parameter: names look like {names[:3]}")

    def rule_for(path: tuple) -> dict[str, Any]:
        name = path_name(path)
        return next((options for pattern, options in rules if re.fullmatch(pattern, name)), {})

    return rule_for


def _rule_values(rules, params, key: str, default: float) -> Any:
    """A tree like ``params`` holding each leaf's ``key`` from the first rule whose regex fully matches its
    path (``default`` when none does)."""
    rule_for = _rule_lookup(rules, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: rule_for(path).get(key, default), params)


def scale_gradients_by_path(rules) -> optax.GradientTransformation:
    """Multiply each gradient by its rule's ``lr_scale`` (before weight decay and momentum, so the decay
    is not scaled: PyTorch's per-group ``lr`` with ``weight_decay / lr``)."""
    def update(updates, state, params=None):
        scales = _rule_values(rules, updates, "lr_scale", 1.0)
        return jax.tree.map(lambda u, s: u * s if s != 1.0 else u, updates, scales), state

    def init(params):
        _rule_values(rules, params, "lr_scale", 1.0)  # a rule that matches nothing fails here, before compiling
        return optax.EmptyState()

    return optax.GradientTransformation(init, update)


class FreezeState(NamedTuple):
    count: jax.Array  # int32 []: updates done


def freeze_by_path(rules, steps_per_epoch: int) -> optax.GradientTransformation:
    """Zero the whole update (decay and momentum included) of parameters whose rule's ``train_epochs`` have
    passed: they stay where they are, as a PyTorch parameter with ``requires_grad=False``."""
    def update(updates, state, params=None):
        epochs = _rule_values(rules, updates, "train_epochs", -1)  # -1: no freezing

        def gate(u, e):
            return u if e < 0 else jnp.where(state.count < round(e * steps_per_epoch), u, jnp.zeros_like(u))

        return jax.tree.map(gate, updates, epochs), FreezeState(state.count + 1)

    return optax.GradientTransformation(lambda params: FreezeState(jnp.zeros((), jnp.int32)), update)


class LookaheadState(NamedTuple):
    slow: Any  # the slow weights, like params
    count: jax.Array  # int32 []
    synced: jax.Array  # bool []: the last update moved the weights to the slow average
    slow_stats: Any = ()  # the slow batch-norm statistics, like batch_stats (set by reset_lookahead)


def lookahead(every: int, final_decay: float, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """Lookahead weight averaging: every ``every`` steps (and at the last step) the slow weights move to
    ``decay * slow + (1 - decay) * fast`` and the fast weights are reset to them; ``decay`` ramps up as
    ``final_decay * (step / total_steps)^3``, so early training is not slowed. Must come last in a chain
    (it needs the finished updates) and needs ``params``.

    Batch-norm running statistics are averaged the same way when the update gets them as the extra argument
    ``batch_stats`` and the state was prepared by :func:`reset_lookahead`; :func:`synced_batch_stats` then
    gives the statistics to keep (the slow ones on a sync step), so the final weights and statistics match."""
    def init(params):
        return LookaheadState(jax.tree.map(jnp.copy, params), jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def update(updates, state, params=None, *, batch_stats=None, **extra_args):
        del extra_args
        count = state.count + 1
        sync = (count % every == 0) | (count == total_steps)
        decay = final_decay * (jnp.minimum(count, total_steps) / total_steps) ** 3
        average = lambda s, f: jnp.where(sync, decay * s + (1 - decay) * f, s)  # noqa: E731
        slow = jax.tree.map(average, state.slow, optax.apply_updates(params, updates))
        updates = jax.tree.map(lambda u, s, p: jnp.where(sync, s - p, u), updates, slow, params)
        slow_stats = state.slow_stats
        if batch_stats is not None and jax.tree.leaves(batch_stats):
            if jax.tree.structure(slow_stats) != jax.tree.structure(batch_stats):
                raise ValueError("lookahead got batch_stats but its state has no slow copy of them: "
                                 "call reset_lookahead(opt_state, params, batch_stats) after tx.init")
            slow_stats = jax.tree.map(average, slow_stats, batch_stats)
        return updates, LookaheadState(slow, count, sync, slow_stats)

    return optax.GradientTransformationExtraArgs(init, update)


def _is_lookahead(x: Any) -> bool:
    return isinstance(x, LookaheadState)


def reset_lookahead(opt_state: Any, params: Any, batch_stats: Any) -> Any:
    """``opt_state`` whose lookahead (if any) restarts its slow copies from ``params`` and ``batch_stats`` (so
    it averages the batch-norm statistics too); for a fresh state and after loading other weights."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    return jax.tree.map(lambda x: x._replace(slow=copy(params), slow_stats=copy(batch_stats)) if _is_lookahead(x)
                        else x, opt_state, is_leaf=_is_lookahead)


def synced_batch_stats(opt_state: Any, batch_stats: Any) -> Any:
    """The batch-norm statistics to keep after an update: the lookahead's slow average on a sync step,
    otherwise ``batch_stats`` (also when there is no lookahead or no statistics)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_lookahead) if _is_lookahead(x)]
    if not found or not jax.tree.leaves(batch_stats):
        return batch_stats
    la = found[0]
    return jax.tree.map(lambda s, b: jnp.where(la.synced, s, b), la.slow_stats, batch_stats)
