"""Orbax checkpoints: the latest N epochs plus the best by the selection metric (validation accuracy, or
training accuracy for runs without a validation split), each holding the whole training state (a pytree)
and the loop's JSON metadata (history, config, versions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxcifar.errors import CheckpointError, ConfigError
from jaxcifar.train.config import TrainConfig

SELECTION_METRICS = ("val_accuracy", "train_accuracy")  # what "best" means, named for what it measured


def _metric(metrics: dict[str, float]) -> float:
    """The selection metric a checkpoint was saved with: ``val_accuracy``, else ``train_accuracy``."""
    return next(metrics[k] for k in SELECTION_METRICS if k in metrics)


def checkpoint_manager(directory: str | Path, keep: int = 2) -> ocp.CheckpointManager:
    """A manager that keeps the ``keep`` latest epochs and the best one (by the selection metric).
    Saves are synchronous, so a checkpoint that exists is complete (Orbax writes to a temporary
    directory and renames it)."""
    policy = pp.AnyPreservationPolicy([pp.LatestN(n=keep), pp.BestN(get_metric_fn=_metric, n=1)])
    # best_fn as well: Orbax writes the metrics into a checkpoint only when it is set, and without them a
    # restarted manager cannot tell "best" from "latest" (nor prune by it).
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_metric, best_mode="max",
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state: Any, meta: dict[str, Any],
         metrics: dict[str, float]) -> None:
    """Save epoch ``epoch`` with its selection metric (``{"val_accuracy": x}`` or ``{"train_accuracy": x}``)."""
    manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 metrics=metrics)
    manager.wait_until_finished()


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The epoch of the best saved checkpoint (by its selection metric), or the latest if none has metrics."""
    return manager.best_step() if manager.best_step() is not None else manager.latest_step()


def checkpoint_step(manager: ocp.CheckpointManager, directory: str | Path, which: str | int) -> int:
    """The checkpoint step ``which`` names (``'latest'``, ``'best'`` or an epoch), checked to exist."""
    step = manager.latest_step() if which == "latest" else best_step(manager) if which == "best" else int(which)
    if step is None or step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint {which!r} in {directory} (have {manager.all_steps()}): train first")
    return step


def restore(directory: str | Path, target: Any, which: str | int = "latest",
            fields: tuple[str, ...] | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore ``(state, meta)`` from ``directory``; ``which`` is ``'latest'``, ``'best'`` or an epoch.
    ``target`` is a state of the same structure (e.g. freshly initialized) whose shapes and shardings
    the restored arrays take. With ``fields`` only those fields of the state are read (the rest keep
    ``target``'s values): loading weights for inference needs no optimizer state, which a user's optimizer
    may shape differently. A checkpoint written before a field existed restores with ``target``'s value for it
    when that value is empty (e.g. no moving average)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"no checkpoint directory {directory}: train first or pass the right path")
    manager = checkpoint_manager(directory)
    step = checkpoint_step(manager, directory, which)
    names = fields or tuple(f for f in target.__dataclass_fields__ if jax.tree.leaves(getattr(target, f)))
    wanted = {f: getattr(target, f) for f in names}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted)
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                         partial_restore=True), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {directory}/{step} does not fit this model/config ({e}): "
                              f"use the config it was written with") from e
    _check_shapes(out.state, abstract, directory, step)
    return target.replace(**out.state), out.meta


def _check_shapes(restored: Any, abstract: Any, directory: Path, step: int) -> None:
    """A partial restore takes what is on disk: refuse arrays whose shapes differ from the target's."""
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(abstract),
                                 strict=True):
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint {directory}/{step} does not fit this model/config (at "
                                  f"{jax.tree_util.keystr(path)}: {tuple(got.shape)} on disk, {tuple(want.shape)} "
                                  "here): use the config it was written with")


def load_body(params: Any, trained_params: Any, head: str = "head") -> Any:
    """Fine-tuning: ``params`` with every top-level module except ``head`` taken from ``trained_params``
    (e.g. a CIFAR-10 body under a freshly initialized CIFAR-100 head)."""
    missing = set(params) - set(trained_params) - {head}
    if missing:
        raise CheckpointError(f"trained parameters lack modules {sorted(missing)}: use the same model body")
    return {k: (v if k == head else trained_params[k]) for k, v in params.items()}


# Config fields a resumed run may change: they do not change what the finished epochs computed.
NOT_CHECKED_ON_RESUME = {"epochs", "early_stopping_patience", "keep_checkpoints", "checkpoint_every", "log_every",
                         "run_strategy", "runs_per_chunk", "devices"}


def check_resumable(saved: dict[str, Any], meta: dict[str, Any], directory: str | Path) -> None:
    """Refuse a checkpoint written by another config, other runs or another model (fields added since it was
    written compare at their defaults)."""
    def config(d: dict[str, Any]) -> dict[str, Any]:
        full = TrainConfig.from_dict({k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__})
        return {k: v for k, v in _jsonable(full.to_dict()).items() if k not in NOT_CHECKED_ON_RESUME}

    def model(d: dict[str, Any]) -> Any:
        return (d.get("components") or {}).get("model_repr")

    same = (config(saved["config"]) == config(meta["config"]) and _jsonable(saved["runs"]) == _jsonable(meta["runs"])
            and model(saved) == model(meta))
    if not same:
        raise ConfigError(f"the checkpoint in {directory} was written by a different config: use a new output "
                          f"directory, or resume=False to start over")


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
