"""Orbax checkpoints: the latest N epochs plus the best by the selection metric (validation accuracy, or
training accuracy for runs without a validation split), each holding the whole training state (a pytree)
and the loop's JSON metadata (history, config, versions), saved in the background (:class:`Saver`) and
checked against their recorded checksums when read."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxcifar.data.cache import atomic_write_bytes, sha256_of
from jaxcifar.errors import CheckpointError, first_line, warn
from jaxcifar.train.config import TrainConfig

SELECTION_METRICS = ("val_accuracy", "train_accuracy")  # what "best" means, named for what it measured


def _metric(metrics: dict[str, float]) -> float:
    """The selection metric a checkpoint was saved with: ``val_accuracy``, else ``train_accuracy``."""
    return next(metrics[k] for k in SELECTION_METRICS if k in metrics)


def checkpoint_manager(directory: str | Path, keep: int = 2, asynchronous: bool = False) -> ocp.CheckpointManager:
    """A manager that keeps the ``keep`` latest epochs and the best one (by the selection metric). Orbax
    writes each checkpoint into a temporary directory and renames it when complete, so a checkpoint that
    exists is complete, whether it was saved synchronously or in the background (``asynchronous``)."""
    policy = pp.AnyPreservationPolicy([pp.LatestN(n=keep), pp.BestN(get_metric_fn=_metric, n=1)])
    # best_fn as well: Orbax writes the metrics into a checkpoint only when it is set, and without them a
    # restarted manager cannot tell "best" from "latest" (nor prune by it).
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_metric, best_mode="max",
                                           enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


class Saver:
    """Saves a group's epochs in the background, so the device trains the next epoch while the last one is
    written: Orbax's asynchronous save blocks only while it copies the arrays to the host (the state can be
    donated to the next step right after), then writes them from its own threads.

    A save is finished (and its files' checksums written, :func:`verify`) when the next one starts, or when
    the ``with`` block ends, normally or by an exception; a process killed while a save is under way leaves
    only Orbax's temporary directory, which is never read as a checkpoint."""

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.manager = checkpoint_manager(directory, keep, asynchronous=True)
        self._pending: int | None = None  # the epoch whose save may still be running

    def save(self, epoch: int, state: Any, meta: dict[str, Any], metrics: dict[str, float]) -> None:
        """Start saving epoch ``epoch`` with its selection metric (``{"val_accuracy": x}`` or
        ``{"train_accuracy": x}``) once the previous save has finished; returns once the arrays are on the
        host."""
        self.finish()
        # a copy: Orbax serializes the metadata later, in its own thread, and the histories grow meanwhile.
        # "checksummed": the checksum file is part of this checkpoint, so a missing one is damage (read_meta)
        meta = json.loads(json.dumps({**meta, "checksummed": True}))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        if self.manager.save(epoch, args=args, metrics=metrics):
            self._pending = epoch

    def finish(self) -> None:
        """Wait for the save under way, then record every file's size and SHA-256 beside it."""
        self.manager.wait_until_finished()
        epoch, self._pending = self._pending, None
        if epoch is not None and jax.process_index() == 0:
            write_checksums(Path(self.manager.directory) / str(epoch))

    def __enter__(self) -> Saver:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        """Finish the last save and release Orbax's threads; after a failure in training, a failed save is a
        warning, so that the original error is the one raised."""
        try:
            self.finish()
            self.manager.close()
        except Exception as e:
            if kind is None:
                raise
            warn(f"the checkpoint being saved when training stopped is incomplete ({first_line(e)})")


# Sizes and SHA-256 of a checkpoint's files, written after Orbax finished it: a damaged file (truncated,
# deleted, flipped bits, which Orbax does not always notice) is found before anything is read from it.
CHECKSUMS = "jaxcifar_checksums.json"


def write_checksums(step_dir: Path) -> None:
    """Write :data:`CHECKSUMS` into the finished checkpoint ``step_dir`` (atomically)."""
    payload = json.dumps(_file_digests(step_dir)).encode()
    atomic_write_bytes(step_dir / CHECKSUMS, lambda f: f.write(payload))


def _file_digests(step_dir: Path) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256]}`` of every file under ``step_dir`` but the checksum file."""
    digests = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digests[path.relative_to(step_dir).as_posix()] = [path.stat().st_size, sha256_of(path)]
    return digests


def verify(directory: str | Path, step: int) -> bool:
    """Check checkpoint ``step``'s files against the checksums written when it was saved; False when it has no
    checksum file (:func:`read_meta` then tells an older checkpoint from a damaged one). A ``CheckpointError``
    names the first file that is missing or changed."""
    step_dir = Path(directory) / str(step)
    try:
        recorded = json.loads((step_dir / CHECKSUMS).read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: its checksum file cannot be read "
                              f"({first_line(e)})") from e
    for name, (size, digest) in sorted(recorded.items()):
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {step_dir} is damaged: {name} is missing")
        if path.stat().st_size != size or sha256_of(path) != digest:
            raise CheckpointError(f"checkpoint {step_dir} is damaged: {name} changed since it was saved")
    return True


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The epoch of the best saved checkpoint (by its selection metric), or the latest if none has metrics."""
    return manager.best_step() if manager.best_step() is not None else manager.latest_step()


def checkpoint_step(manager: ocp.CheckpointManager, directory: str | Path, which: str | int) -> int:
    """The checkpoint step ``which`` names (``'latest'``, ``'best'`` or an epoch), checked to exist."""
    step = manager.latest_step() if which == "latest" else best_step(manager) if which == "best" else int(which)
    if step is None or step not in manager.all_steps():
        raise CheckpointError(f"no checkpoint {which!r} in {directory} (have {manager.all_steps()}): train first")
    return step


# State fields added after the first checkpoints were written: a checkpoint without one restores with the
# target's value (no moving average; never diverged).
OPTIONAL_FIELDS = ("ema", "diverged_at")


def read_meta(manager: ocp.CheckpointManager, directory: str | Path, step: int) -> dict[str, Any]:
    """The JSON metadata (config, runs, histories, ...) of checkpoint ``step``; a ``CheckpointError`` when it
    cannot be read, or when its checksum file is missing though its metadata says one was written (a checkpoint
    from before checksums existed has no such record and is left to Orbax's own checks; one killed between
    Orbax's last write and the checksums' counts as damaged, and the previous epoch is used)."""
    checked = verify(directory, step)
    out, error = _orbax_restore(manager, step, meta=ocp.args.JsonRestore())
    if error is not None:
        raise CheckpointError(f"checkpoint {directory}/{step} is damaged: its metadata cannot be read ({error})")
    meta = out.meta
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"checkpoint {directory}/{step} is damaged: its metadata records no config")
    if meta.get("checksummed") and not checked:
        raise CheckpointError(f"checkpoint {directory}/{step} is damaged: its checksum file {CHECKSUMS} is missing")
    return meta


def read_state(manager: ocp.CheckpointManager, directory: str | Path, step: int, target: Any,
               fields: tuple[str, ...] | None = None) -> Any:
    """``target`` (a state of the same structure, e.g. freshly initialized, whose shapes and shardings the
    arrays take) with the arrays of checkpoint ``step``; with ``fields`` only those fields are read (loading
    weights for inference needs no optimizer state, which a user's optimizer may shape differently). Fields
    in :data:`OPTIONAL_FIELDS` that the checkpoint lacks keep ``target``'s value. A ``CheckpointError`` when
    the arrays cannot be read or do not fit ``target``."""
    names = fields or tuple(target.__dataclass_fields__)
    wanted = {f: getattr(target, f) for f in names if jax.tree.leaves(getattr(target, f))}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted)
    out, error = _orbax_restore(manager, step, state=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
    if error is not None:
        raise CheckpointError(f"checkpoint {directory}/{step} is damaged or does not fit this model/config: its "
                              f"arrays cannot be read ({error})")
    restored = dict(out.state)
    for name, value in restored.items():
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(value)):  # not in the checkpoint
            if name not in OPTIONAL_FIELDS:
                raise CheckpointError(f"checkpoint {directory}/{step} lacks (part of) the state's {name!r}: it is "
                                      "damaged or from another model")
            restored[name] = getattr(target, name)
    _check_shapes(restored, abstract, directory, step)
    return target.replace(**restored)


def restore(directory: str | Path, target: Any, which: str | int = "latest",
            fields: tuple[str, ...] | None = None) -> tuple[Any, dict[str, Any]]:
    """Restore ``(state, meta)`` of one checkpoint in ``directory``: ``which`` is ``'latest'``, ``'best'`` or an
    epoch (see :func:`read_state` for ``target`` and ``fields``)."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"no checkpoint directory {directory}: train first or pass the right path")
    manager = checkpoint_manager(directory)
    step = checkpoint_step(manager, directory, which)
    meta = read_meta(manager, directory, step)
    return read_state(manager, directory, step, target, fields), meta


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_usable` found: the state and metadata of checkpoint ``step``."""

    state: Any
    meta: dict[str, Any]
    step: int


def restore_usable(directory: str | Path, target: Callable[[dict[str, Any], int], Any],
                   newest: int | None = None) -> Restored | None:
    """The newest checkpoint in ``directory`` (at most epoch ``newest``) whose files match their checksums
    and whose arrays restore into ``target(meta, step)`` (a state; it checks the metadata and raises to refuse
    it); None when the directory holds no checkpoint.

    Each damaged checkpoint (or one ``target`` refused with ``CheckpointError``) is reported in one warning
    line and the next older one is tried; once one restores, the damaged newer ones are moved into
    ``directory/damaged/`` (never deleted: they may be worth inspecting, and a later save of their epoch would
    collide with them). ``target`` raising anything else (e.g. ``ConfigError``: another config wrote it) stops
    the search. When none is usable a one-line ``CheckpointError`` says so and nothing is moved."""
    directory = Path(directory)
    manager = checkpoint_manager(directory)
    steps = sorted((s for s in manager.all_steps() if newest is None or s <= newest), reverse=True)
    skipped: list[int] = []
    for step in steps:
        try:
            meta = read_meta(manager, directory, step)
            state = read_state(manager, directory, step, target(meta, step))
        except CheckpointError as e:
            skipped.append(step)
            warn(f"{e}: trying an older checkpoint")
            continue
        for bad in skipped:
            warn(f"damaged checkpoint {directory}/{bad} moved to {set_aside(directory, bad, 'damaged')}")
        return Restored(state, meta, step)
    if skipped:
        problem = f"no usable checkpoint in {directory} (all {len(skipped)} damaged, see above): move them away to "
        raise CheckpointError(problem + "start over, or pass resume=False",
                              cli=problem + "start over, or pass --no-resume")
    return None


def set_aside(directory: str | Path, step: int, folder: str) -> Path:
    """Move checkpoint ``step`` into ``directory/folder/`` (a name Orbax does not read as a step) and return
    its new path; a second one of the same epoch gets a numbered name."""
    dest_dir = Path(directory) / folder
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / str(step)
    n = 1
    while dest.exists():
        dest = dest_dir / f"{step}.{n}"
        n += 1
    os.replace(Path(directory) / str(step), dest)
    return dest


def _orbax_restore(manager: ocp.CheckpointManager, step: int, **items: Any) -> tuple[Any, str | None]:
    """``(restored, None)``, or ``(None, "Type: first line")`` when Orbax fails (a damaged checkpoint). Orbax is
    silenced meanwhile: absl logs every item it was not asked for, and a failed restore leaves unfinished
    TensorStore reads that print tracebacks (some from its threads, at the C level) when they are collected.
    So stderr is held back for the duration: shown after a success, dropped after a failure, once the
    leftovers are collected; the caller reports the failure as one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR + 10)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            out, error = manager.restore(step, args=ocp.args.Composite(**items)), None
        except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many types for a damaged file)
            out, error = None, first_line(e)
            traceback.clear_frames(e.__traceback__)  # the frames hold the unfinished reads
        if error is not None:
            gc.collect()
            time.sleep(0.05)  # TensorStore's threads report the cancelled reads
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        logger.setLevel(level)
        if error is None:
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
    return out, error


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


def saved_config(recorded: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint recorded, with the fields added since at their defaults (and fields it
    records that no longer exist left out)."""
    return TrainConfig.from_dict({k: v for k, v in recorded.items() if k in TrainConfig.__dataclass_fields__})
