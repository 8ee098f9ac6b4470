"""``fit``: the one training loop every experiment uses.

``fit`` reads top-down: validate the config → put the data on the device → make the run plan
(:mod:`~jaxcifar.train.plan`) → build the step functions and the epoch program
(:mod:`~jaxcifar.train.program`) → for each group of runs: initialize or restore, train the epochs,
summarize. Data stays on the device as uint8; each epoch is a device-side permutation cut into compiled
chunks of steps. With ``runs`` the state carries a leading run axis: each run has its own seed (init,
dropout, data order, augmentation) and hyper-parameters, all trained at once in one compiled program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxcifar.data import Dataset
from jaxcifar.errors import ConfigError, warn
from jaxcifar.lock import DirectoryLock
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.callbacks import Callback, CallbackList, EpochHook, Event, JsonlWriter, Start, TensorBoardWriter
from jaxcifar.train.compilation import CompileClock
from jaxcifar.train.components import Components, LossFn, MetricsFn, TxFactory, check_components
from jaxcifar.train.config import TrainConfig, validate_config
from jaxcifar.train.group import Group, run_figures
from jaxcifar.train.history import append_epoch, interval_means, interval_points, last_epoch
from jaxcifar.train.parallel import replicate
from jaxcifar.train.plan import RunPlan, cuda_fallback, halving_group_size, make_plan
from jaxcifar.train.program import PROGRAMS, EpochProgram, build_program, program_key
from jaxcifar.train.resume import ResumeFrom, restore_group
from jaxcifar.train.runs import concat_runs, memory_budget
from jaxcifar.train.setup import PreparedData, build, init_state, prepare_data
from jaxcifar.train.state import TrainState, stack_states
from jaxcifar.train.steps import StepFns

__all__ = ["RUN_KEYS", "FitResult", "fit"]

RUN_KEYS = ("seed", "dropout_rate", "learning_rate", "weight_decay")
BUILT_IN_CHANGES = {"learning_rate", "weight_decay", "grad_clip_norm"}  # resume changes of the built-in optimizer
EpochHookFn = Callable[[int, list[dict[str, Any]]], None]


@dataclass
class FitResult:
    """What :func:`fit` returns: per-run histories and summaries, the final state and the step functions.
    ``run_axis``: the state has a leading run axis (``fit(runs=...)``), whatever the run strategy."""

    config: TrainConfig
    runs: list[dict[str, Any]]
    histories: list[dict[str, Any]]
    summaries: list[dict[str, Any]]
    state: TrainState
    fns: StepFns
    run_axis: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def history(self) -> dict[str, Any]:
        return self.histories[0]

    @property
    def summary(self) -> dict[str, Any]:
        return self.summaries[0]


def fit(
    config: TrainConfig,
    dataset: Dataset | PreparedData,
    *,
    runs: Sequence[dict[str, Any]] | None = None,
    checkpoint_dir: str | None = None,
    resume: bool | ResumeFrom = True,
    progress: bool = True,
    on_epoch_end: EpochHookFn | None = None,
    body: dict[str, Any] | None = None,
    model: nn.Module | Callable[..., Any] | None = None,
    tx: optax.GradientTransformation | TxFactory | None = None,
    loss_fn: LossFn | None = None,
    metrics_fn: MetricsFn | None = None,
    callbacks: Sequence[Any] = (),
    log_dir: str | None = None,
    tensorboard: bool = False,
) -> FitResult:
    """Train ``config`` on ``dataset``; with ``runs`` (a list of per-run overrides, see :data:`RUN_KEYS`)
    train them all at once in one compiled program (``config.run_strategy``), ``config.runs_per_chunk`` runs
    at a time (default: as many as fit in memory).

    Your own pieces replace the config's named ones: ``model`` (a Linen module, or an NNX module's
    constructor), ``tx`` (an optax
    transformation or a factory ``(config, steps_per_epoch) -> tx``), ``loss_fn(logits, labels)`` (per-example)
    and ``metrics_fn(logits, labels)`` (extra per-example metrics, kept in the histories); the protocol is in
    :mod:`jaxcifar.train.components`.

    Checkpoints into ``checkpoint_dir`` (locked against a second process while training) every
    ``config.checkpoint_every`` epochs and after the last (one sub-directory per group of runs when there are
    several groups) and resumes from the newest usable checkpoint when ``resume`` (damaged ones are skipped
    and moved aside); ``resume=ResumeFrom(epoch, allow_changes)`` resumes from an earlier epoch and/or with a
    changed learning rate, weight decay or clipping. A run whose loss becomes NaN/inf stops a single-run fit
    with an error saying how to go on; in a sweep it is frozen (``diverged_at_epoch`` in its summary) and the
    other runs finish. ``callbacks`` (see :mod:`jaxcifar.train.callbacks`) are called every ``log_every`` steps and
    every epoch; ``metrics.jsonl`` (and with ``tensorboard`` TensorBoard event files, one directory per run) is
    written into ``log_dir`` (default ``checkpoint_dir``). ``on_epoch_end(epoch, histories)`` is called after
    every epoch (after its checkpoint, if it has one, has started saving: checkpoints are written in the
    background while the next epoch trains, and are complete when ``fit`` returns or raises). ``body``
    (trained ``{"params", "batch_stats"}``, e.g. ``load_trained(dir).variables``) fine-tunes: every module but
    the classifier ``head`` starts from it.
    """
    components = Components(model, tx, loss_fn, metrics_fn)
    run_list = _checked_runs(config, runs, components)
    built_in_only = sorted(set(resume.allow_changes) & BUILT_IN_CHANGES) if isinstance(resume, ResumeFrom) else []
    if built_in_only and tx is not None:
        raise ConfigError(f"resume allowing {built_in_only} needs the built-in optimizer (it injects the learning "
                          "rate and weight decay); with your own tx allow 'tx' and pass the changed tx instead")
    setup = CompileClock()  # the data's and the step functions' start-up, counted with the groups' own
    with setup:  # splitting and the channel statistics run small programs on the device
        data = _prepared(dataset, config, per_run_split=runs is not None and config.split_per_run)
        validate_config(config, train_size=data.train_size)
        plan = make_plan(config, len(run_list), runs is not None, data.train_size)
        data = _placed(data, plan)
    fallback = cuda_fallback(plan.backend)
    if fallback:
        warn(f"{fallback} is installed but JAX runs on the CPU (is the driver too old for it?), so training takes "
             "the CPU defaults: JAX_PLATFORMS=cuda shows why, --require-gpu (require_accelerator()) stops instead")
    key = program_key(config, data, plan, components)
    writers = [*callbacks, *_writers(log_dir or checkpoint_dir, tensorboard)]
    results: list[FitResult] = []
    # one lock per job: in a multi-host job every process writes into the same directory, with Orbax's coordination
    locked = checkpoint_dir is not None and jax.process_index() == 0
    with DirectoryLock(checkpoint_dir) if locked else contextlib.nullcontext():
        with setup:
            steps = PROGRAMS.get(("steps", key), lambda: build(config, data, plan.data_mesh, components))
            size = (plan.group_size or (resume is not False and _saved_group_size(checkpoint_dir, plan.n_runs))
                    or _group_size_that_fits(config, data, steps, plan, key, run_list))
        for members in plan.groups(size):
            program = _program(config, data, steps, plan, key, len(members))
            group_dir = _group_dir(checkpoint_dir, members, plan.n_runs, size)
            done = [h for r in results for h in r.histories]
            hooks = CallbackList(writers + ([EpochHook(on_epoch_end, done)] if on_epoch_end else []))
            with CompileClock() as init:
                group = Group.start(config, data, steps, program, plan, list(members), run_list, group_dir, body,
                                     components)
            results.append(train_group(group, resume, progress, hooks, init))
    return _merged(config, run_list, plan, size, steps, results, setup)


def _writers(directory: str | None, tensorboard: bool) -> list[Callback]:
    """``metrics.jsonl`` in ``directory`` (when there is one), and TensorBoard files under
    ``directory/tensorboard``."""
    if directory is None:
        if tensorboard:
            raise ConfigError("tensorboard=True needs a directory to write to: pass log_dir (or checkpoint_dir)")
        return []
    writers: list[Callback] = [JsonlWriter(f"{directory}/metrics.jsonl")]
    if tensorboard:
        writers.append(TensorBoardWriter(f"{directory}/tensorboard"))
    return writers


def _checked_runs(config: TrainConfig, runs: Sequence[dict[str, Any]] | None,
                  components: Components) -> list[dict[str, Any]]:
    """The runs as plain dicts (``[{}]`` for a single run), each validated with the config, and the user's
    pieces checked against them."""
    validate_config(config)
    check_components(components, config, dropout_varies=any("dropout_rate" in r for r in runs or []))
    if runs is None:
        return [{}]
    if not runs:
        raise ConfigError("runs is empty: give at least one run, or runs=None for a single run")
    for r in runs:
        unknown = set(r) - set(RUN_KEYS)
        if unknown:
            raise ConfigError(f"run axis {sorted(unknown)} is not supported: vary only {list(RUN_KEYS)}")
        validate_config(config.replace(**{k: v for k, v in r.items() if k != "seed"}))
    return [dict(r) for r in runs]


def _prepared(dataset: Dataset | PreparedData, config: TrainConfig, per_run_split: bool) -> PreparedData:
    if isinstance(dataset, PreparedData):
        return dataset
    if not isinstance(dataset, Dataset):
        raise ConfigError(f"fit takes a jaxcifar Dataset, got {type(dataset).__name__}: wrap arrays with "
                          "Dataset.from_arrays(train_images, train_labels, test_images, test_labels), or load one "
                          "with load_cifar")
    return prepare_data(dataset, config, per_run_split)


def _placed(data: PreparedData, plan: RunPlan) -> PreparedData:
    """``data`` replicated over the plan's devices (unchanged on one device)."""
    if plan.mesh.size == 1:
        return data
    splits = {k: getattr(data, k) for k in ("train", "val", "test")}
    return dataclasses.replace(data, **{k: None if v is None else replicate(v, plan.mesh) for k, v in splits.items()})


def _program(config: TrainConfig, data: PreparedData, steps: StepFns, plan: RunPlan, key: tuple,
             n_runs: int) -> EpochProgram:
    """The epoch program for a group of ``n_runs`` runs, built once per process (:data:`PROGRAMS`)."""
    return PROGRAMS.get(("epoch", key, n_runs), lambda: build_program(config, data, steps, plan, n_runs))


def _group_size_that_fits(config: TrainConfig, data: PreparedData, steps: StepFns, plan: RunPlan, key: tuple,
                          runs: list[dict[str, Any]]) -> int:
    """The largest group (halving from all runs) whose compiled chunk fits the memory budget. The program it
    compiles is the one the group then trains with (jit's cache keeps it)."""
    budget = memory_budget()

    def fits(n: int) -> bool:
        program = _program(config, data, steps, plan, key, n)
        state = jax.eval_shape(lambda: stack_states([init_state(config, steps, r) for r in runs[:n]]))
        return program.chunk_bytes(state, data) <= budget

    return halving_group_size(len(runs), fits)


def _saved_group_size(checkpoint_dir: str | None, n_runs: int) -> int | None:
    """The group size an earlier fit into ``checkpoint_dir`` used (read off its layout: checkpoints at the top
    for one group, ``runs_0000-0003/``, ... for groups of 4), or None when it holds none. A resume keeps it,
    so that it finds its groups' checkpoints, and needs no memory probe (which compiles a training chunk)."""
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if directory is None or not directory.is_dir():
        return None
    if any(p.name.isdigit() for p in directory.iterdir()):
        return n_runs
    first = sorted(directory.glob("runs_0000-[0-9][0-9][0-9][0-9]"))
    return int(first[0].name[-4:]) + 1 if first else None


def _group_dir(checkpoint_dir: str | None, members: range, n_runs: int, size: int) -> str | None:
    """The group's checkpoint directory: ``checkpoint_dir`` itself when all runs form one group."""
    if checkpoint_dir is None or size >= n_runs:
        return checkpoint_dir
    return f"{checkpoint_dir}/runs_{members[0]:04d}-{members[-1]:04d}"


def train_group(g: Group, resume: bool | ResumeFrom, progress: bool, callbacks: CallbackList | None = None,
                init: CompileClock | None = None) -> FitResult:
    """Train one group of runs: restore or start, compile, run the epochs, summarize. ``init`` timed the
    group's initialization; it counts into the start-up figures."""
    init = init or CompileClock()
    callbacks = callbacks or CallbackList([])
    with CompileClock() as compiles:
        state, histories, changes = restore_group(g, resume, progress)
        # created after the restore, which may have moved damaged or superseded checkpoints aside
        saver = ckpt.Saver(g.checkpoint_dir, g.config.keep_checkpoints) if g.checkpoint_dir else None
        start_epoch = int(np.max(jax.device_get(state.epoch)))
        summaries = None
        if start_epoch < g.config.epochs:
            g.program.precompile(state, g.data, g.train_index, g.eval_plans)
        else:  # a finished run reopened: its evaluation is all there is to compile
            summaries = g.summaries(state, histories)
    startup = {"startup_seconds": init.wall + compiles.wall, "compile_seconds": init.seconds + compiles.seconds,
               "compilations": init.compiles + compiles.compiles}
    start = Start(g.run_ids, start_epoch, start_epoch * g.steps_per_epoch)
    callbacks.on_start(start)
    # a save runs while the next epoch trains; leaving the block (normally or not) finishes the last one
    with CompileClock() as later, saver or contextlib.nullcontext():
        for epoch in range(start_epoch + 1, g.config.epochs + 1):
            state = _epoch(g, state, epoch, histories, progress, callbacks)
            diverged = g.check_divergence(state, epoch, saver, progress)
            stop = _should_stop(g.config, state, epoch, diverged) or epoch == g.config.epochs
            # the last checkpoint records the summaries, so that load_sweep needs no data and no evaluation
            summaries = g.summaries(state, histories) if stop else None
            if saver is not None and (stop or _saves(g.config, epoch)):
                saver.save(epoch, state, {**g.meta, "histories": histories, "config_changes": changes,
                                          **({"summaries": summaries} if stop else {})},
                           g.selection_metrics(histories))
            callbacks.on_epoch(Event("epoch", epoch, epoch * g.steps_per_epoch, g.run_ids,
                                     [last_epoch(h) for h in histories], state, histories))
            if stop:
                break
    callbacks.on_end(start)
    meta = {**g.meta, **startup, "epoch_compilations": later.compiles, "config_changes": changes}
    return FitResult(g.config, g.runs, histories, summaries, state, None, g.meta["run_axis"], meta)


def _epoch(g: Group, state: TrainState, epoch: int, histories: list[dict[str, Any]], progress: bool,
           callbacks: CallbackList) -> TrainState:
    """Train one epoch, evaluate, close it (best weights, plateau) and append it to every run's history."""
    t0 = time.perf_counter()
    state, train_m = _train_epoch(g, state, epoch, progress, callbacks, histories)
    if g.has_val:
        val = g.evaluate(state, "val")
    else:  # the selection metric falls back to the epoch's training figures
        val = {"loss": train_m["loss"].mean(-1), "accuracy": train_m["accuracy"].mean(-1)}
    ema_val = g.evaluate(state, "val", "ema") if g.has_val and g.has_ema else None
    # a run whose training loss went NaN/inf diverged even if its validation loss is finite: end_epoch marks it
    closing_loss = np.where(np.isfinite(train_m["loss"]).all(-1), val["loss"], np.nan)
    state = g.program.end_epoch(state, _per_run(g, closing_loss), _per_run(g, val["accuracy"]))
    lrs = np.asarray(jax.device_get(g.program.current_lr(state))).reshape(len(g.runs))
    seconds = time.perf_counter() - t0
    for r, h in enumerate(histories):
        append_epoch(h, epoch, g.config.log_every, {k: v[r] for k, v in train_m.items()},
                     run_figures(val, r) if g.has_val else None, ema_val and run_figures(ema_val, r), lrs[r],
                     seconds)
    if progress:
        _print_epoch(g, epoch, train_m, val, seconds)
    return state


def _per_run(g: Group, values: np.ndarray) -> jax.Array:
    """Per-run figures as the state's run axis takes them (a scalar without one); ``device_put`` rather than
    ``jnp.asarray``, which compiles a copy program."""
    return jax.device_put(np.asarray(values if g.meta["run_axis"] else values[0], np.float32))


def _train_epoch(g: Group, state: TrainState, epoch: int, progress: bool, callbacks: CallbackList,
                 histories: list[dict[str, Any]]) -> tuple[TrainState, dict[str, Any]]:
    """Run the epoch's chunks; return the state and the per-step training metrics [runs, steps]. Metrics come
    back to the host once per logging interval (for the progress bar and the interval callbacks)."""
    spe = g.steps_per_epoch
    chunks = g.program.order(state.rng, epoch, g.train_index)
    bar = tqdm(total=spe, desc=f"epoch {epoch}/{g.config.epochs}", unit="step", disable=not progress, leave=False)
    points = list(interval_points(spe, g.config.log_every))
    metrics, host, finished, logged = [], [], None, 0  # host: the chunks' metrics fetched so far
    for (_, end), index in zip(g.program.bounds, chunks, strict=True):
        state, m = g.program.run_chunk(state, *g.data.train, index)
        metrics.append(m)
        if progress and finished is not None:  # the bar counts finished steps; the new chunk keeps running
            jax.block_until_ready(finished[1])
            bar.update(finished[0] - bar.n)
        finished = (end, m["loss"])
        crossed = [p for p in points[logged:] if p <= end]
        if progress and (crossed or end == spe):
            last = jax.device_get(m)
            bar.update(end - bar.n)
            bar.set_postfix(loss=f"{np.mean(last['loss']):.3f}", acc=f"{np.mean(last['accuracy']):.3f}")
        if crossed and callbacks.wants_intervals:
            host += jax.device_get(metrics[len(host):])
            _report_intervals(g, callbacks, epoch, _per_step(g, host), crossed, state, histories)
        logged += len(crossed)
    bar.close()
    host += jax.device_get(metrics[len(host):])
    return state, _per_step(g, host)


def _per_step(g: Group, host: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Chunks' metrics (already on the host) joined: every metric float [runs, steps so far]."""
    joined = jax.tree.map(lambda *xs: np.concatenate(xs, axis=-1), *host)
    return {k: np.asarray(v).reshape(len(g.runs), -1) for k, v in joined.items()}


def _report_intervals(g: Group, callbacks: CallbackList, epoch: int, per_step: dict[str, np.ndarray],
                      points: list[int], state: TrainState, histories: list[dict[str, Any]]) -> None:
    """One interval event per logging point in ``points`` (steps since the epoch's start)."""
    for point in points:
        figures = [interval_means({k: v[r] for k, v in per_step.items()}, point, g.config.log_every)
                   for r in range(len(g.runs))]
        step = (epoch - 1) * g.steps_per_epoch + point
        callbacks.on_interval(Event("interval", epoch, step, g.run_ids, figures, state, histories))


def _print_epoch(g: Group, epoch: int, train_m: dict[str, Any], val: dict[str, Any], seconds: float) -> None:
    line = (f"epoch {epoch}/{g.config.epochs}: train loss {train_m['loss'].mean():.4f} "
            f"acc {train_m['accuracy'].mean():.4f} | ")
    if g.has_val:
        line += f"val loss {val['loss'].mean():.4f} acc {val['accuracy'].mean():.4f} | "
    tqdm.write(line + f"{seconds:.1f}s")


def _saves(config: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` is checkpointed: every ``checkpoint_every`` epochs and the last one."""
    return epoch % config.checkpoint_every == 0 or epoch == config.epochs


def _should_stop(config: TrainConfig, state: TrainState, epoch: int, diverged: np.ndarray) -> bool:
    """Stop when every run diverged (bool [runs]), or with early stopping when every run went
    ``early_stopping_patience`` epochs without a better selection metric (or diverged)."""
    if diverged.all():
        return True
    if not config.early_stopping_patience:
        return False
    best_epochs = np.asarray(jax.device_get(state.best_epoch)).reshape(diverged.shape)
    return bool(np.all((epoch - best_epochs >= config.early_stopping_patience) | diverged))


def _merged(config: TrainConfig, runs: list[dict[str, Any]], plan: RunPlan, size: int, steps: StepFns,
            results: list[FitResult], setup: CompileClock) -> FitResult:
    """One result for all groups: histories and summaries in run order, states concatenated on the run axis;
    the start-up figures are the groups' and the ``setup``'s (step functions, memory probe)."""
    first = results[0]
    meta = {**first.meta, "runs": runs, "runs_per_chunk": size, "run_groups": len(results),
            "devices": plan.mesh.size, "parallel": plan.parallel,
            "startup_seconds": setup.wall + sum(r.meta["startup_seconds"] for r in results),
            "compile_seconds": setup.seconds + sum(r.meta["compile_seconds"] for r in results),
            "compilations": setup.compiles + sum(r.meta["compilations"] for r in results),
            "epoch_compilations": sum(r.meta["epoch_compilations"] for r in results)}
    histories = [h for r in results for h in r.histories]
    summaries = [s for r in results for s in r.summaries]
    state = concat_runs([r.state for r in results])
    return FitResult(config, runs, histories, summaries, state, steps, plan.run_axis, meta)
