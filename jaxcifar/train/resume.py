"""Resuming a group of runs from its checkpoints: the newest usable one (damaged ones are skipped and set
aside) written with the same config, runs, model and pieces (:func:`check_resumable`), optionally an earlier
epoch, optionally with allowed changes (:class:`ResumeFrom`): a changed learning rate, weight decay or
gradient clipping is the way to go on after a run diverged."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcifar.errors import CheckpointError, ConfigError
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.checkpoint import saved_config
from jaxcifar.train.fingerprint import tree_signature
from jaxcifar.train.group import Group
from jaxcifar.train.history import history_problem, new_history
from jaxcifar.train.optim import depends_on_epochs, make_optimizer
from jaxcifar.train.setup import HYPERPARAMS
from jaxcifar.train.state import TrainState

# Config fields a resumed run may change: they do not change what the finished epochs computed. (`epochs` is
# checked apart: it matters only where the schedule is laid out over it.)
NOT_CHECKED_ON_RESUME = {"epochs", "early_stopping_patience", "keep_checkpoints", "checkpoint_every", "log_every",
                         "run_strategy", "runs_per_chunk", "devices"}


# What a resume may change when asked to (ResumeFrom.allow_changes): after a divergence, continue from the last
# good checkpoint with a lower learning rate, other weight decay or gradient clipping; train longer under a
# schedule laid out over the epochs; go on with a changed optimizer, loss, metrics or augmentation function.
CHANGEABLE_ON_RESUME = ("learning_rate", "weight_decay", "grad_clip_norm", "epochs", "tx", "loss_fn", "metrics_fn",
                        "augment")
PIECES = {"tx": "optimizer (tx)", "loss_fn": "loss_fn", "metrics_fn": "metrics_fn",
          "augment": "augmentation function(s)"}  # the user's pieces a checkpoint fingerprints, as messages name them


@dataclass(frozen=True)
class ResumeFrom:
    """How :func:`~jaxcifar.train.fit` resumes, beyond ``resume=True`` (the latest checkpoint, same config and
    pieces): from checkpoint ``epoch`` (later ones are moved into ``superseded/``, not deleted), and/or with
    the changes in ``allow_changes`` (of :data:`CHANGEABLE_ON_RESUME`) allowed. A changed ``epochs`` under a
    schedule laid out over the epochs continues from the current step of the new schedule (the learning rate
    takes the new schedule's value there). The changes are recorded in the result's ``meta['config_changes']``."""

    epoch: int | None = None
    allow_changes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.allow_changes) - set(CHANGEABLE_ON_RESUME))
        if unknown:
            raise ConfigError(f"cannot change {unknown} on resume: only {list(CHANGEABLE_ON_RESUME)} may change "
                              "(the finished epochs would not match the others)")
        if self.epoch is not None and (isinstance(self.epoch, bool) or self.epoch < 1):
            raise ConfigError(f"resume from epoch {self.epoch!r}: give an epoch >= 1 that has a checkpoint")


def check_resumable(saved: dict[str, Any], meta: dict[str, Any], directory: str | Path,
                    allowed: Sequence[str] = ()) -> dict[str, list[Any]]:
    """Refuse, in one line naming what differs, a checkpoint written by another config, other runs, another
    model, another user piece (optimizer, loss, metrics, augmentation functions: compared by fingerprint) or
    another ``epochs`` under a schedule laid out over it (fields added since it was written compare at their
    defaults; pieces it did not fingerprint are not compared). Changes of the ``allowed`` fields and pieces
    are returned as ``{name: [checkpoint's value, this run's value]}``."""
    old, new = _checked_config(saved), _checked_config(meta)
    changed = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    if _epochs_matter(saved) or _epochs_matter(meta):
        epochs = [saved_config(d["config"]).epochs for d in (saved, meta)]
        changed.update({"epochs": epochs} if epochs[0] != epochs[1] else {})
    prints = [(d.get("components") or {}).get("fingerprints") for d in (saved, meta)]
    if prints[0] is not None:
        changed.update({k: [prints[0].get(k), (prints[1] or {}).get(k)] for k in PIECES
                        if prints[0].get(k) != (prints[1] or {}).get(k)})
    over, over_cli = "use a new directory or resume=False to start over", "use a new --out or --no-resume"
    if _jsonable(saved["runs"]) != _jsonable(meta["runs"]) or _model(saved) != _model(meta):
        problem = f"the checkpoint in {directory} was written for other runs or another model: "
        raise ConfigError(problem + over, cli=problem + over_cli)
    refused = [k for k in changed if k not in allowed]
    if refused:
        problem = f"the checkpoint in {directory} was written with another {_named(refused, changed)}: "
        if set(refused) <= set(CHANGEABLE_ON_RESUME):  # the fix names exactly what to allow
            raise ConfigError(f"{problem}allow it with resume=ResumeFrom(allow_changes={tuple(refused)!r}), or "
                              f"{over}", cli=f"{problem}allow it with --allow-config-change {','.join(refused)}, or "
                              f"{over_cli}")
        raise ConfigError(problem + over, cli=problem + over_cli)
    return changed


def _checked_config(d: dict[str, Any]) -> dict[str, Any]:
    """The recorded config's fields that a resume compares."""
    return {k: v for k, v in _jsonable(saved_config(d["config"]).to_dict()).items() if k not in NOT_CHECKED_ON_RESUME}


def _model(d: dict[str, Any]) -> Any:
    return (d.get("components") or {}).get("model_repr")


def _epochs_matter(d: dict[str, Any]) -> bool:
    """Whether the run recorded in ``d`` uses the built-in optimizer with a schedule laid out over ``epochs``
    (a user's optimizer is compared by fingerprint: a factory that reads ``epochs`` builds another one)."""
    return (d.get("components") or {}).get("tx") is None and depends_on_epochs(saved_config(d["config"]))


def _named(refused: list[str], changed: dict[str, list[Any]]) -> str:
    """The refused differences in words: config fields with their two values, pieces by name."""
    parts = []
    for k in refused:
        if k in PIECES:
            parts.append(PIECES[k])
        elif k == "epochs":
            parts.append(f"epochs ({changed[k][0]} -> {changed[k][1]}; the schedule is laid out over the epochs: when "
                         "allowed, training goes on from the current step of the new schedule)")
        else:
            parts.append(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})")
    return "; ".join(parts)


def restore_group(g: Group, resume: bool | ResumeFrom, progress: bool
                  ) -> tuple[TrainState, list[dict[str, Any]], list[dict[str, Any]]]:
    """``(state, histories, config_changes)`` to start the group from: the newest usable checkpoint (at most
    ``resume.epoch``) when resuming and there is one, else a fresh start. ``config_changes`` lists every
    resume that changed the config, the checkpoint's earlier ones first."""
    fresh = g.initial, [new_history() for _ in g.runs], []
    if g.checkpoint_dir is None:
        return fresh
    if resume is False:
        _supersede_after(g.checkpoint_dir, 0)
        return fresh
    how = resume if isinstance(resume, ResumeFrom) else ResumeFrom()
    if how.epoch is not None:
        _require_epoch(g.checkpoint_dir, how.epoch)
    changes: dict[str, list[Any]] = {}

    def target(saved: dict[str, Any], step: int) -> TrainState:
        """Check the checkpoint's metadata (a history that does not match its epoch means damage) and give
        the state to restore into."""
        changes.clear()
        changes.update(check_resumable(saved, g.meta, g.checkpoint_dir, how.allow_changes))
        problem = _histories_problem(saved.get("histories"), step, len(g.runs))
        if problem:
            raise CheckpointError(f"checkpoint {g.checkpoint_dir}/{step} is damaged: {problem}")
        state = _shaped_like_checkpoint(g, saved["config"])
        recorded = saved.get("opt_state")  # absent in checkpoints written before it was recorded
        if recorded is not None and recorded != tree_signature(state.opt_state):
            problem = f"the optimizer state in {g.checkpoint_dir} is not this optimizer's (its structure differs): "
            raise ConfigError(problem + "start over with resume=False or use a new directory",
                              cli=problem + "start over with --no-resume or use a new --out")
        return state

    found = ckpt.restore_usable(g.checkpoint_dir, target, how.epoch)
    if found is None:
        return fresh
    _supersede_after(g.checkpoint_dir, found.step)  # only once the checkpoint restored and fits this config
    state = _with_changes(g, found.state, changes) if changes else found.state
    history_of_changes = list(found.meta.get("config_changes", []))
    if changes:
        history_of_changes.append({"resumed_after_epoch": found.step, "changes": changes})
    if progress:
        changed = f" with {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())}" if changes else ""
        if "epochs" in changes:
            changed += f" (the schedule goes on from step {int(np.max(jax.device_get(state.step)))} of the new one)"
        tqdm.write(f"resuming after epoch {found.step} from {g.checkpoint_dir}{changed} (--no-resume starts over)")
    return state, found.meta["histories"], history_of_changes


def _histories_problem(histories: Any, step: int, n_runs: int) -> str | None:
    """Why ``histories`` (from a checkpoint's metadata) are not those of ``n_runs`` runs after ``step`` epochs."""
    if not isinstance(histories, list) or len(histories) != n_runs:
        return f"it holds no history for each of the {n_runs} runs"
    for h in histories:
        problem = history_problem(h, step)
        if problem:
            return problem
    return None


def _require_epoch(directory: str, epoch: int) -> None:
    """Resuming from ``epoch`` needs its checkpoint: a one-line error naming those there are otherwise."""
    steps = ckpt.checkpoint_manager(directory).all_steps() if Path(directory).is_dir() else []
    if epoch not in steps:
        raise CheckpointError(f"no checkpoint of epoch {epoch} in {directory} (have {steps}): pick one of those")


def _supersede_after(directory: str, epoch: int) -> None:
    """Going on from ``epoch`` (0: starting over): move the later checkpoints into ``superseded/`` (kept, not
    deleted; the run writes its own epochs in their place, and a later resume must not find the old ones)."""
    if not Path(directory).is_dir():
        return
    manager = ckpt.checkpoint_manager(directory)
    for step in manager.all_steps():
        if step > epoch:
            tqdm.write(f"{f'resuming from epoch {epoch}' if epoch else 'starting over'}: checkpoint {step} moved "
                       f"to {ckpt.set_aside(directory, step, 'superseded')}")


def _shaped_like_checkpoint(g: Group, recorded: dict[str, Any]) -> TrainState:
    """The state to restore into: the group's fresh state, whose optimizer state is shaped like the
    checkpoint's when gradient clipping was switched on or off since (the chain gains or loses a step)."""
    old = saved_config(recorded)
    if bool(old.grad_clip_norm) == bool(g.config.grad_clip_norm):
        return g.initial
    tx = make_optimizer(old, g.steps_per_epoch)
    init = jax.vmap(tx.init) if g.meta["run_axis"] else tx.init
    placed = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # moved onto the group's devices afterwards
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed),
                          jax.eval_shape(init, g.initial.params))
    return g.initial.replace(opt_state=shapes)


def _with_changes(g: Group, state: TrainState, changes: dict[str, list[Any]]) -> TrainState:
    """The restored ``state`` under the changed config: its optimizer state's arrays in the new optimizer's
    structure (gradient clipping keeps no state, so the arrays carry over one to one) and the new injected
    learning rate / weight decay."""
    fresh = g.initial.opt_state
    leaves, fresh_leaves = jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh)
    if [x.shape for x in leaves] != [x.shape for x in fresh_leaves]:
        problem = f"the optimizer state in {g.checkpoint_dir} does not carry over to the changed config {list(changes)}"
        raise CheckpointError(f"{problem}: start over with resume=False", cli=f"{problem}: start over with --no-resume")
    placed = [jax.device_put(x, f.sharding) for x, f in zip(leaves, fresh_leaves, strict=True)]
    opt_state = jax.tree.unflatten(jax.tree.structure(fresh), placed)
    injected = {k: fresh.hyperparams[k] for k in changes if k in HYPERPARAMS}
    if injected:
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **injected})
    return state.replace(opt_state=opt_state)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
