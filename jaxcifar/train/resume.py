"""Resuming a group of runs from its checkpoints: the newest usable one (damaged ones are skipped and set
aside), optionally an earlier epoch, optionally with a changed learning rate, weight decay or gradient
clipping (:class:`~jaxcifar.train.checkpoint.ResumeFrom`) — the way to go on after a run diverged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxcifar.errors import CheckpointError
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.checkpoint import ResumeFrom, check_resumable
from jaxcifar.train.group import Group
from jaxcifar.train.history import history_problem, new_history
from jaxcifar.train.optim import make_optimizer
from jaxcifar.train.setup import HYPERPARAMS
from jaxcifar.train.state import TrainState


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
        return _shaped_like_checkpoint(g, saved["config"])

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


def _shaped_like_checkpoint(g: Group, saved_config: dict[str, Any]) -> TrainState:
    """The state to restore into: the group's fresh state, whose optimizer state is shaped like the
    checkpoint's when gradient clipping was switched on or off since (the chain gains or loses a step)."""
    old = ckpt.saved_config(saved_config)
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
        raise CheckpointError(f"the optimizer state in {g.checkpoint_dir} does not carry over to the changed "
                              f"config {sorted(changes)}: start over with --no-resume")
    placed = [jax.device_put(x, f.sharding) for x, f in zip(leaves, fresh_leaves, strict=True)]
    opt_state = jax.tree.unflatten(jax.tree.structure(fresh), placed)
    injected = {k: fresh.hyperparams[k] for k in changes if k in HYPERPARAMS}
    if injected:
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, **injected})
    return state.replace(opt_state=opt_state)
