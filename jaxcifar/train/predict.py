"""Load a trained model from a ``fit`` checkpoint directory and predict class probabilities."""

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
from jaxcifar.train.components import Components
from jaxcifar.train.config import TrainConfig
from jaxcifar.train.setup import build_for, init_state
from jaxcifar.train.state import stack_states, unstack_state
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
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory {directory}: train first or pass the right path")
    manager = ckpt.checkpoint_manager(directory)
    step = ckpt.checkpoint_step(manager, directory, which)
    meta = ckpt.read_meta(manager, directory, step)
    num_classes = meta.get("num_classes", num_classes)
    if num_classes is None:
        raise CheckpointError(f"{directory} does not record its class count: pass num_classes")
    config = TrainConfig.from_dict(meta["config"])
    _check_loadable(config, meta, directory, model, ema)
    runs = meta["runs"]
    if not 0 <= run < len(runs):
        raise CheckpointError(f"run {run} is not in {directory} (it holds {len(runs)} runs): pick 0..{len(runs) - 1}")
    norm = meta["normalization"]
    # Only what inference uses: the recorded augmentations and optimizer play no part.
    inference = config.replace(augment=())
    fns = build_for(inference, norm["mean"], norm["std"], num_classes,
                    meta.get("train_size", config.batch_size), components=Components(model=model))
    states = [init_state(inference, fns, r) for r in runs]
    run_axis = meta.get("run_axis", meta.get("vmapped"))  # checkpoints before 0.2 call it "vmapped"
    fields = WEIGHT_FIELDS + (("ema",) if ema else ())
    state = ckpt.read_state(manager, directory, step, stack_states(states) if run_axis else states[0], fields)
    if run_axis:
        state = unstack_state(state, run)
    variables = state.weights("ema" if ema else "best" if which == "best" else "current")
    epoch = int(state.best_epoch) if which == "best" and not ema else int(state.epoch)
    return Trained(fns, variables, config, meta, epoch, step)


def _check_loadable(config: TrainConfig, meta: dict[str, Any], directory: Path, model: nn.Module | None,
                    ema: bool) -> None:
    """Clear errors for a checkpoint that needs the user's module, or that has no moving average."""
    recorded = (meta.get("components") or {}).get("model_repr")
    if model is None and config.model not in MODELS:
        raise CheckpointError(f"{directory} was trained with the model {config.model.removeprefix('custom:')}: pass "
                              "load_trained(dir, model=<that module>), or register it with register_model")
    if model is not None and recorded is not None and repr(model) != recorded:
        raise CheckpointError(f"{directory} was trained with {recorded.splitlines()[0]}... whose fields differ from "
                              f"the model given: pass the module with the fields it was trained with")
    if ema and config.ema_decay is None:
        raise CheckpointError(f"{directory} keeps no moving average (ema_decay was not set): load without ema")
