"""A run's history: per-epoch figures and per-interval training figures, as plain JSON-able lists.

Keys: ``epoch``, ``train_<m>`` and ``val_<m>`` for every metric ``m`` (``loss``, ``accuracy`` and the user's
extra ones; validation entries are None without a validation split), ``val_<m>_ema`` with a moving average of
the weights, ``lr`` (None when a user's optimizer injects no learning rate), ``epoch_seconds``, and
``interval``: ``step`` and every metric averaged over each ``log_every`` steps of an epoch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BASE_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


def new_history() -> dict[str, Any]:
    """An empty history (extra metrics' keys are added by the first epoch that has them)."""
    return {**{k: [] for k in BASE_KEYS}, "interval": {"step": [], "loss": [], "accuracy": []}}


def interval_points(spe: int, log_every: int) -> range:
    """The logging points of an epoch, as steps since its start: every ``log_every`` steps (a last partial
    interval is not logged)."""
    return range(log_every, spe + 1, log_every)


def interval_means(per_step: dict[str, np.ndarray], end: int, log_every: int) -> dict[str, float | None]:
    """Every metric averaged over the ``log_every`` steps before ``end`` (steps since the epoch's start; None
    for NaN)."""
    return {k: _value(v[end - log_every:end].mean()) for k, v in per_step.items()}


def _value(x: Any) -> float | None:
    """A float for the history, None for a missing or NaN figure."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def append_epoch(h: dict[str, Any], epoch: int, log_every: int, per_step: dict[str, np.ndarray],
                 val: dict[str, float] | None, ema_val: dict[str, float] | None, lr: float, seconds: float) -> None:
    """Append one run's epoch to its history ``h``: ``per_step`` training metrics [steps], validation figures
    (None without a validation split), the moving average's validation figures (None without one)."""
    spe = len(per_step["loss"])
    h["epoch"].append(epoch)
    for name, values in per_step.items():
        h.setdefault(f"train_{name}", []).append(_value(values.mean()))
        h.setdefault(f"val_{name}", []).append(None if val is None else _value(val[name]))
        if ema_val is not None:
            h.setdefault(f"val_{name}_ema", []).append(_value(ema_val[name]))
    h["lr"].append(_value(lr))
    h["epoch_seconds"].append(seconds)
    for end in interval_points(spe, log_every):
        h["interval"]["step"].append((epoch - 1) * spe + end)
        for name, value in interval_means(per_step, end, log_every).items():
            h["interval"].setdefault(name, []).append(value)


def history_problem(h: Any, epochs: int) -> str | None:
    """Why ``h`` is not the history of ``epochs`` finished epochs (e.g. a shortened or edited saved history), or
    None when it is."""
    if not isinstance(h, dict) or h.get("epoch") != list(range(1, epochs + 1)):
        return f"its history does not record epochs 1..{epochs}"
    short = sorted(k for k, v in h.items() if k != "interval" and (not isinstance(v, list) or len(v) != epochs))
    if short:
        return f"its history's {short} do not hold {epochs} epochs"
    return None


def last_epoch(h: dict[str, Any]) -> dict[str, float | None]:
    """The figures of the history's last epoch (what an epoch event carries)."""
    return {k: v[-1] for k, v in h.items() if k not in ("epoch", "interval") and v}


def summary(best_accuracy: float, best_epoch: int, has_val: bool, test_best: dict[str, float],
            test_final: dict[str, float], test_ema: dict[str, float] | None, epochs_run: int,
            diverged_at: int = 0) -> dict[str, Any]:
    """One run's summary: the best epoch and its selection accuracy, the test figures of the best weights
    (``test_<m>``), of the last ones (``final_test_accuracy``) and of the moving average (``test_<m>_ema``),
    and ``diverged_at_epoch`` (None, or the epoch whose loss became NaN/inf: the run was frozen there)."""
    out: dict[str, Any] = {
        "best_val_accuracy": best_accuracy, "best_epoch": best_epoch,
        "selected_on": "validation" if has_val else "training",  # training: best_val_accuracy is training's
        "test_accuracy": test_best["accuracy"], "test_loss": test_best["loss"],
        "final_test_accuracy": test_final["accuracy"], "epochs_run": epochs_run,
        "diverged_at_epoch": diverged_at or None,
    }
    out.update({f"test_{k}": v for k, v in test_best.items() if k not in ("accuracy", "loss")})
    if test_ema is not None:
        out.update({f"test_{k}_ema": v for k, v in test_ema.items()})
    return out
