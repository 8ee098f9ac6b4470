"""Callbacks and metric writers for :func:`~jaxcifar.train.fit`.

A callback is any object with some of these methods (subclass :class:`Callback` for no-op defaults):

* ``on_start(start: Start)``: a group of runs starts, fresh or resumed (``start.step`` > 0 after a resume);
* ``on_interval(event: Event)``: every ``config.log_every`` steps of an epoch, with the interval's mean metrics;
* ``on_epoch(event: Event)``: after every epoch (and its checkpoint), with the epoch's figures;
* ``on_end(start: Start)``: the group is done (close files here).

Metrics are per run (``event.metrics[i]`` belongs to run ``event.runs[i]``, its index in ``fit(runs=...)``).
``event.state`` is the group's state (a leading run axis with several runs) after the compiled chunk that
holds ``event.step``: the steps run in compiled chunks (``config.unroll`` steps on CPU, a whole epoch with
``loop='scan'``), so the state may be a few steps later than the figures, and it is valid only during the call
(the next chunk takes over its buffers): ``jax.device_get`` what you keep. Callbacks run on every process;
the writers here write on process 0 only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from jaxcifar.train.state import TrainState


@dataclass(frozen=True)
class Start:
    """A group of runs begins: their global indices, the epoch and global step it starts after."""

    runs: list[int]
    epoch: int
    step: int


@dataclass(frozen=True)
class Event:
    """One logging point. ``kind`` is ``'interval'`` or ``'epoch'``; ``step`` is the global training step the
    figures end at; ``metrics[i]`` are run ``runs[i]``'s figures (interval: ``loss``, ``accuracy`` and extra
    metrics over the interval; epoch: the history's entries of the epoch); ``histories`` are the group's runs'
    whole histories so far."""

    kind: str
    epoch: int
    step: int
    runs: list[int]
    metrics: list[dict[str, float | None]]
    state: TrainState
    histories: list[dict[str, Any]]


class Callback:
    """Base class with every hook a no-op; override the ones you need."""

    def on_start(self, start: Start) -> None:
        """A group of runs starts (after restoring a checkpoint, if any)."""

    def on_interval(self, event: Event) -> None:
        """Every ``log_every`` steps."""

    def on_epoch(self, event: Event) -> None:
        """After every epoch."""

    def on_end(self, start: Start) -> None:
        """The group is done."""


class CallbackList(Callback):
    """Several callbacks called in order; objects may define only some of the hooks."""

    def __init__(self, callbacks: Sequence[Any]):
        self.callbacks = list(callbacks)

    def _call(self, hook: str, arg: Any) -> None:
        for c in self.callbacks:
            fn = getattr(c, hook, None)
            if fn is not None:
                fn(arg)

    def on_start(self, start: Start) -> None:
        self._call("on_start", start)

    def on_interval(self, event: Event) -> None:
        self._call("on_interval", event)

    def on_epoch(self, event: Event) -> None:
        self._call("on_epoch", event)

    def on_end(self, start: Start) -> None:
        self._call("on_end", start)

    @property
    def wants_intervals(self) -> bool:
        """Whether any callback has an ``on_interval`` of its own (else interval figures are not fetched)."""
        return any(getattr(type(c), "on_interval", None) not in (None, Callback.on_interval) for c in self.callbacks)


def _writes() -> bool:
    """Only the first process writes files (every process runs the same callbacks)."""
    return jax.process_index() == 0


def _records(event: Event) -> list[dict[str, Any]]:
    return [{"kind": event.kind, "run": run, "epoch": event.epoch, "step": event.step, **m}
            for run, m in zip(event.runs, event.metrics, strict=True)]


class JsonlWriter(Callback):
    """Appends one JSON line per run per interval and per epoch to ``path`` (``fit`` writes ``metrics.jsonl``
    into its log directory). On a resume it first drops the lines of the resumed runs written after the
    restored step (the file is rewritten atomically), so the file matches the training that continues."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_start(self, start: Start) -> None:
        if not _writes() or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            if record.get("run") not in start.runs or record.get("step", 0) <= start.step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, self.path)

    def _write(self, event: Event) -> None:
        if not _writes():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for record in _records(event):
                f.write(json.dumps(record) + "\n")

    def on_interval(self, event: Event) -> None:
        self._write(event)

    def on_epoch(self, event: Event) -> None:
        self._write(event)


class TensorBoardWriter(Callback):
    """TensorBoard event files (``tensorboardX``), one directory per run: ``logdir/run_000``, ... Interval
    figures go under ``interval/``, epoch figures (train and validation loss and accuracy, learning rate,
    extra metrics, the moving average's) under ``epoch/``, all against the global step, so
    ``tensorboard --logdir DIR`` shows every run of a sweep. A resume purges the events after the restored
    step."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.writers: dict[int, Any] = {}

    def on_start(self, start: Start) -> None:
        if not _writes():
            return
        from tensorboardX import SummaryWriter

        purge = start.step + 1 if start.step else None
        for run in start.runs:
            self.writers[run] = SummaryWriter(str(self.logdir / f"run_{run:03d}"), purge_step=purge)

    def _write(self, event: Event, prefix: str) -> None:
        for run, metrics in zip(event.runs, event.metrics, strict=True):
            writer = self.writers.get(run)
            if writer is None:
                continue
            for name, value in metrics.items():
                if isinstance(value, int | float) and value == value:  # None and NaN are not figures
                    writer.add_scalar(f"{prefix}/{name}", value, event.step)
            writer.flush()

    def on_interval(self, event: Event) -> None:
        self._write(event, "interval")

    def on_epoch(self, event: Event) -> None:
        self._write(event, "epoch")

    def on_end(self, start: Start) -> None:
        for run in start.runs:
            writer = self.writers.pop(run, None)
            if writer is not None:
                writer.close()


class ProfileTrace(Callback):
    """A ``jax.profiler`` trace (view it in TensorBoard's profile tab or Perfetto) of about ``num_steps``
    training steps from the first logging point at or after ``start_step`` into ``directory`` (``fit`` compiles
    every program before the first step, so the trace holds training only). It starts and stops at logging
    points, so ``log_every`` sets how closely it follows the figures asked for."""

    def __init__(self, directory: str | Path, start_step: int = 1, num_steps: int = 20):
        self.directory = Path(directory)
        self.start_step = start_step
        self.num_steps = num_steps
        self.started_at: int | None = None
        self.done = False

    def on_interval(self, event: Event) -> None:
        if self.done:
            return
        if self.started_at is None and event.step >= self.start_step:
            jax.block_until_ready(event.state)
            jax.profiler.start_trace(str(self.directory))
            self.started_at = event.step
        elif self.started_at is not None and event.step >= self.started_at + self.num_steps:
            self._stop(event.state)

    def on_epoch(self, event: Event) -> None:
        self.on_interval(event)

    def _stop(self, state: Any) -> None:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.done = True

    def on_end(self, start: Start) -> None:
        if self.started_at is not None and not self.done:
            self._stop(None)


class EpochHook(Callback):
    """``fn(epoch, histories)`` after every epoch, ``histories`` being every run's so far: ``earlier`` (the runs
    of groups that finished before) and this group's. The ``on_epoch_end`` argument of ``fit``."""

    def __init__(self, fn: Callable[[int, list[dict[str, Any]]], None], earlier: list[dict[str, Any]]):
        self.fn = fn
        self.earlier = earlier

    def on_epoch(self, event: Event) -> None:
        self.fn(event.epoch, self.earlier + event.histories)
