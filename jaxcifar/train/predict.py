"""Load a trained model from a ``fit`` checkpoint directory and predict class probabilities; read a finished
sweep back for analysis (:func:`load_sweep`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxcifar.data.checks import checked_images
from jaxcifar.errors import CheckpointError
from jaxcifar.models import MODELS
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.checkpoint import saved_config
from jaxcifar.train.components import Components, as_model
from jaxcifar.train.config import TrainConfig
from jaxcifar.train.loop import FitResult
from jaxcifar.train.runs import concat_runs
from jaxcifar.train.setup import build_for, init_state
from jaxcifar.train.state import TrainState, stack_states, unstack_state
from jaxcifar.train.steps import StepFns


@dataclass(frozen=True)
class Trained:
    """A model restored for inference: its step functions, variables, config and checkpoint metadata.
    ``epoch`` is the epoch whose weights ``variables`` are (for ``'best'``: the run's best epoch, which may be
    older than the checkpoint); ``checkpoint_step`` is the checkpoint they were read from."""

    fns: StepFns
    variables: dict[str, Any]
    config: TrainConfig
    meta: dict[str, Any]
    epoch: int
    checkpoint_step: int

    def probabilities(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Softmax probabilities float32 [N, classes] for images uint8 [N, 32, 32, 3] or float [0, 1], or one
        HWC image (then N = 1). Other layouts and ranges raise ``DataError`` saying the fix
        (:func:`~jaxcifar.data.checks.checked_images`)."""
        images = checked_images(images)
        f = jax.jit(self.fns.probabilities)
        return np.concatenate([np.asarray(f(self.variables, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])

    def predict(self, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class indices int [N] (see :meth:`probabilities` for the inputs taken)."""
        return self.probabilities(images, batch_size).argmax(-1)


WEIGHT_FIELDS = ("params", "batch_stats", "best_params", "best_batch_stats", "best_epoch", "epoch")


def load_trained(directory: str | Path, which: str | int = "best", run: int = 0,
                 num_classes: int | None = None, model: nn.Module | None = None, ema: bool = False) -> Trained:
    """Restore run ``run`` of the checkpoint ``which`` written by :func:`~jaxcifar.train.fit` into
    ``directory``: ``'best'`` (the run's best weights from the best checkpoint, selected on validation
    accuracy, or on training accuracy for runs without a validation split: ``meta['histories']`` and the
    summary's ``selected_on`` say which), ``'latest'``, or an epoch. With ``ema`` the moving average of the
    weights at that checkpoint (``config.ema_decay``) instead.

    ``model``: the module a run trained with ``fit(model=...)`` used (the same class and fields); registered
    and built-in models are rebuilt by name. ``num_classes`` is needed only for checkpoints that do not record
    it. Only the weights are read, so the optimizer, loss and augmentations need not be given."""
    manager, step, meta = _opened(directory, which)
    fns, config = _inference(meta, Path(directory), num_classes, model, ema)
    runs = meta["runs"]
    if not 0 <= run < len(runs):
        raise CheckpointError(f"run {run} is not in {directory} (it holds {len(runs)} runs): pick 0..{len(runs) - 1}")
    states = [init_state(config, fns, r) for r in runs]
    run_axis = meta.get("run_axis", meta.get("vmapped"))  # checkpoints before 0.2 call it "vmapped"
    state = ckpt.read_state(manager, directory, step, stack_states(states) if run_axis else states[0],
                            _weight_fields(ema))
    if run_axis:
        state = unstack_state(state, run)
    variables = state.weights("ema" if ema else "best" if which == "best" else "current")
    epoch = int(state.best_epoch) if which == "best" and not ema else int(state.epoch)
    return Trained(fns, variables, config, meta, epoch, step)


def load_sweep(directory: str | Path, model: nn.Module | None = None) -> FitResult:
    """A finished ``fit`` (one run or a sweep, in one or several groups of runs) read back from its last
    checkpoints, for analysis: what :func:`~jaxcifar.robustness.evaluate_robustness` and
    :func:`~jaxcifar.compare.compare` take, without the data and without building or compiling the training
    program. Its ``state`` holds the weights (current, best and, with ``ema_decay``, averaged; the optimizer
    state is not read), its ``summaries`` are those the last checkpoint recorded; ``model`` as for
    :func:`load_trained`."""
    directory = Path(directory)
    groups = sorted(directory.glob("runs_[0-9][0-9][0-9][0-9]-[0-9][0-9][0-9][0-9]")) or [directory]
    parts = [_sweep_group(d, model) for d in groups]
    fns, meta, _ = parts[0]
    if meta["run_axis"]:
        fields = _weight_fields(saved_config(meta["config"]).ema_decay is not None)
        joined = {f: concat_runs([getattr(state, f) for _, _, state in parts]) for f in fields}
        state = parts[0][2].replace(**joined)
    else:
        state = parts[0][2]
    runs = [r for _, m, _ in parts for r in m["runs"]]
    histories = [h for _, m, _ in parts for h in m["histories"]]
    summaries = [x for _, m, _ in parts for x in m["summaries"]]
    return FitResult(saved_config(meta["config"]), runs, histories, summaries, state, fns, meta["run_axis"],
                     {**meta, "runs": runs, "run_groups": len(parts)})


def _sweep_group(directory: Path, model: nn.Module | None) -> tuple[StepFns, dict[str, Any], TrainState]:
    """One group's inference functions, last checkpoint's metadata and weights (the other fields abstract)."""
    manager, step, meta = _opened(directory, "latest")
    if "summaries" not in meta:
        raise CheckpointError(f"the runs in {directory} are not finished (last checkpoint: epoch {step}), or were "
                              "trained before checkpoints recorded their summaries: finish them with fit first")
    fns, config = _inference(meta, directory, None, model, ema=False)
    placed = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), jax.eval_shape(
        lambda: stack_states([init_state(config, fns, r) for r in meta["runs"]]) if meta["run_axis"]
        else init_state(config, fns, meta["runs"][0])))
    return fns, meta, ckpt.read_state(manager, directory, step, target, _weight_fields(config.ema_decay is not None))


def _weight_fields(ema: bool) -> tuple[str, ...]:
    """The state's fields inference reads: the weights, and with ``ema`` their moving average."""
    return WEIGHT_FIELDS + (("ema",) if ema else ())


def _opened(directory: str | Path, which: str | int) -> tuple[Any, int, dict[str, Any]]:
    """``(manager, step, meta)`` of checkpoint ``which`` in ``directory``, checked to exist."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}: train first or pass the right path")
    manager = ckpt.checkpoint_manager(directory)
    step = ckpt.checkpoint_step(manager, directory, which)
    return manager, step, ckpt.read_meta(manager, directory, step)


def _inference(meta: dict[str, Any], directory: Path, num_classes: int | None, model: nn.Module | None,
               ema: bool) -> tuple[StepFns, TrainConfig]:
    """The step functions for inference with the checkpoint's model and normalization, and the recorded
    config without augmentations (only what inference uses: the augmentations and optimizer play no part)."""
    num_classes = meta.get("num_classes", num_classes)
    if num_classes is None:
        raise CheckpointError(f"{directory} does not record its class count: pass num_classes")
    config = TrainConfig.from_dict(meta["config"])
    _check_loadable(config, meta, directory, model, ema)
    inference = config.replace(augment=())
    norm = meta["normalization"]
    fns = build_for(inference, norm["mean"], norm["std"], num_classes, meta.get("train_size", config.batch_size),
                    components=Components(model=model))
    return fns, inference


def _check_loadable(config: TrainConfig, meta: dict[str, Any], directory: Path, model: nn.Module | None,
                    ema: bool) -> None:
    """Clear errors for a checkpoint that needs the user's module, or that has no moving average."""
    recorded = (meta.get("components") or {}).get("model_repr")
    model = as_model(model)
    if model is None and config.model not in MODELS:
        raise CheckpointError(f"{directory} was trained with the model {config.model.removeprefix('custom:')}: pass "
                              "load_trained(dir, model=<that module>), or register it with register_model")
    if model is not None and recorded is not None and repr(model) != recorded:
        raise CheckpointError(f"{directory} was trained with {recorded.splitlines()[0]}... whose fields differ from "
                              f"the model given: pass the module with the fields it was trained with")
    if ema and config.ema_decay is None:
        raise CheckpointError(f"{directory} keeps no moving average (ema_decay was not set): load without ema")
