"""``fit``: the one training loop every experiment uses.

``fit`` reads top-down: validate the config → put the data on the device → make the run plan
(:mod:`~jaxcifar.train.plan`) → build the step functions and the epoch program
(:mod:`~jaxcifar.train.program`) → for each group of runs: initialize or restore, train the epochs,
summarize. Data stays on the device as uint8; each epoch is a device-side permutation cut into compiled
chunks of steps. With ``runs`` the state carries a leading run axis: each run has its own seed (init,
dropout, data order, augmentation) and hyper-parameters, all trained at once in one compiled program.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcifar.data import Dataset
from jaxcifar.errors import ConfigError, TrainingError
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.compilation import CompileClock
from jaxcifar.train.config import TrainConfig, validate_config
from jaxcifar.train.parallel import replicate, shard_runs
from jaxcifar.train.plan import RunPlan, halving_group_size, make_plan
from jaxcifar.train.program import PROGRAMS, EpochProgram, EvalPlan, build_program, eval_plans, program_key
from jaxcifar.train.runs import concat_runs, memory_budget
from jaxcifar.train.setup import PreparedData, build, init_state, prepare_data, run_splits, with_body
from jaxcifar.train.state import TrainState, stack_states
from jaxcifar.train.steps import StepFns
from jaxcifar.versions import environment

__all__ = ["RUN_KEYS", "FitResult", "fit"]

RUN_KEYS = ("seed", "dropout_rate", "learning_rate", "weight_decay")
EpochHook = Callable[[int, list[dict[str, Any]]], None]


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
    resume: bool = True,
    progress: bool = True,
    on_epoch_end: EpochHook | None = None,
    body: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``config`` on ``dataset``; with ``runs`` (a list of per-run overrides, see :data:`RUN_KEYS`)
    train them all at once in one compiled program (``config.run_strategy``), ``config.runs_per_chunk`` runs
    at a time (default: as many as fit in memory).

    Checkpoints into ``checkpoint_dir`` every ``config.checkpoint_every`` epochs and after the last (one
    sub-directory per group of runs when there are several groups) and resumes from the latest checkpoint
    when ``resume``. ``on_epoch_end(epoch, histories)`` is called after every epoch (after its checkpoint, if
    it has one, is saved). ``body`` (trained ``{"params", "batch_stats"}``, e.g.
    ``load_trained(dir).variables``) fine-tunes: every module but the classifier ``head`` starts from it.
    """
    run_list = _checked_runs(config, runs)
    data = _prepared(dataset, config, per_run_split=runs is not None and config.split_per_run)
    validate_config(config, train_size=data.train_size)
    plan = make_plan(config, len(run_list), runs is not None, data.train_size)
    data = _placed(data, plan)
    key = program_key(config, data, plan)
    steps = PROGRAMS.get(("steps", key), lambda: build(config, data, plan.data_mesh))
    size = plan.group_size or _group_size_that_fits(config, data, steps, plan, key, run_list)
    results: list[FitResult] = []
    for members in plan.groups(size):
        program = _program(config, data, steps, plan, key, len(members))
        group_dir = _group_dir(checkpoint_dir, members, plan.n_runs, size)
        done = [h for r in results for h in r.histories]
        hook = on_epoch_end and (lambda e, hs, done=done: on_epoch_end(e, done + hs))
        with CompileClock() as init:
            group = _Group.start(config, data, steps, program, plan, [run_list[i] for i in members], group_dir,
                                 body)
        results.append(train_group(group, resume, progress, hook, init))
    return _merged(config, run_list, plan, size, steps, results)


def _checked_runs(config: TrainConfig, runs: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The runs as plain dicts (``[{}]`` for a single run), each validated with the config."""
    validate_config(config)
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
    return dataset if isinstance(dataset, PreparedData) else prepare_data(dataset, config, per_run_split)


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


def _group_dir(checkpoint_dir: str | None, members: range, n_runs: int, size: int) -> str | None:
    """The group's checkpoint directory: ``checkpoint_dir`` itself when all runs form one group."""
    if checkpoint_dir is None or size >= n_runs:
        return checkpoint_dir
    return f"{checkpoint_dir}/runs_{members[0]:04d}-{members[-1]:04d}"


@dataclass(frozen=True)
class _Group:
    """What stays fixed while a group of runs trains: its program, data, evaluation batches, checkpoints."""

    config: TrainConfig
    data: PreparedData
    program: EpochProgram
    runs: list[dict[str, Any]]
    initial: TrainState  # fresh (or fine-tuning) state, placed on the devices
    train_index: jax.Array | None  # per-run training indices when each run has its own split
    eval_plans: dict[str, EvalPlan]
    checkpoint_dir: str | None
    meta: dict[str, Any]

    @property
    def has_val(self) -> bool:
        """Whether there is a validation split; without one the best epoch is picked on training metrics."""
        return self.data.val is not None

    @classmethod
    def start(cls, config: TrainConfig, data: PreparedData, steps: StepFns, program: EpochProgram,
              plan: RunPlan, runs: list[dict[str, Any]], checkpoint_dir: str | None,
              body: dict[str, Any] | None) -> _Group:
        """Initialize the group's runs (placed on the plan's devices) and their splits."""
        states = [init_state(config, steps, r, data.train[0]) for r in runs]
        if body is not None:
            states = [with_body(s, body) for s in states]
        state = stack_states(states) if plan.run_axis else states[0]
        if plan.data_mesh is not None:
            state = replicate(state, plan.data_mesh)
        elif plan.run_mesh is not None:
            state = shard_runs(state, plan.run_mesh)
        plans = eval_plans(data, config.eval_batch_size)
        splits = run_splits(data, [int(r.get("seed", config.seed)) for r in runs])
        train_index = None
        if splits is not None:  # per-run validation sets: evaluation indices go through each run's own index
            train_index, val_index = (x if plan.run_axis else x[0] for x in splits)
            plans["val"] = (val_index[..., plans["val"][0]], plans["val"][1])
        meta = {"config": config.to_dict(), "runs": runs, "fine_tuned": body is not None, "loop": plan.loop,
                "chunk": program.bounds[0][1], "run_axis": plan.run_axis, "run_strategy": plan.strategy,
                "normalization": {"mean": data.mean, "std": data.std}, "num_classes": data.num_classes,
                "train_size": data.train_size, "split_per_run": bool(data.per_run_val),
                "environment": environment()}
        return cls(config, data, program, runs, state, train_index, plans, checkpoint_dir, meta)

    def evaluate(self, fn: Callable, state: TrainState, split: str) -> dict[str, np.ndarray]:
        """``fn`` (one of the program's evaluators) over ``split`` (``"val"`` or ``"test"``), per run."""
        images, labels = self.data.val if split == "val" else self.data.test
        out = jax.device_get(fn(state, images, labels, *self.eval_plans[split]))
        return {k: np.asarray(v, np.float32).reshape(len(self.runs)) for k, v in out.items()}


def train_group(g: _Group, resume: bool, progress: bool, on_epoch_end: EpochHook | None,
                init: CompileClock | None = None) -> FitResult:
    """Train one group of runs: restore or start, compile, run the epochs, summarize. ``init`` timed the
    group's initialization; it counts into the start-up figures."""
    init = init or CompileClock()
    with CompileClock() as compiles:
        manager = ckpt.checkpoint_manager(g.checkpoint_dir, g.config.keep_checkpoints) if g.checkpoint_dir else None
        state, histories = _restored(g, manager, resume, progress)
        start_epoch = int(np.max(jax.device_get(state.epoch)))
        if start_epoch < g.config.epochs:
            g.program.precompile(state, g.data, g.train_index, g.eval_plans)
    startup = {"startup_seconds": init.wall + compiles.wall, "compile_seconds": init.seconds + compiles.seconds,
               "compilations": init.compiles + compiles.compiles}
    with CompileClock() as later:
        for epoch in range(start_epoch + 1, g.config.epochs + 1):
            state = _epoch(g, state, epoch, histories, progress)
            stop = _should_stop(g.config, state, epoch)
            if manager is not None and (stop or _saves(g.config, epoch)):
                ckpt.save(manager, epoch, state, {**g.meta, "histories": histories},
                          _selection_metrics(g, histories))
            if on_epoch_end is not None:
                on_epoch_end(epoch, histories)
            if stop:
                break
        summaries = _summaries(g, state, histories)
    meta = {**g.meta, **startup, "epoch_compilations": later.compiles}
    return FitResult(g.config, g.runs, histories, summaries, state, None, g.meta["run_axis"], meta)


def _restored(g: _Group, manager: Any, resume: bool, progress: bool) -> tuple[TrainState, list[dict[str, Any]]]:
    """The latest checkpoint's state and histories (when resuming and there is one), else a fresh start."""
    if manager is None or not resume or manager.latest_step() is None:
        return g.initial, [_new_history() for _ in g.runs]
    state, saved = ckpt.restore(g.checkpoint_dir, g.initial, "latest")
    _check_resumable(saved, g.meta, g.checkpoint_dir)
    if progress:
        tqdm.write(f"resuming after epoch {int(np.max(jax.device_get(state.epoch)))} from {g.checkpoint_dir} "
                   "(--no-resume starts over)")
    return state, saved["histories"]


def _epoch(g: _Group, state: TrainState, epoch: int, histories: list[dict[str, Any]], progress: bool) -> TrainState:
    """Train one epoch, evaluate, close it (best weights, plateau) and append it to every run's history."""
    t0 = time.perf_counter()
    state, train_m = _train_epoch(g, state, epoch, progress)
    if g.has_val:
        val = g.evaluate(g.program.evaluate_val, state, "val")
    else:  # the selection metric falls back to the epoch's training figures
        val = {"loss": train_m["loss"].mean(-1), "accuracy": train_m["accuracy"].mean(-1)}
    if not (np.isfinite(train_m["loss"]).all() and np.isfinite(val["loss"]).all()):
        where = f"; last good checkpoint kept in {g.checkpoint_dir}" if g.checkpoint_dir else ""
        raise TrainingError(f"loss became NaN/inf in epoch {epoch}: lower the learning rate or set "
                            f"grad_clip_norm{where}")
    state = g.program.end_epoch(state, _per_run(g, val["loss"]), _per_run(g, val["accuracy"]))
    lrs = np.asarray(jax.device_get(g.program.current_lr(state))).reshape(len(g.runs))
    seconds = time.perf_counter() - t0
    for r, h in enumerate(histories):
        _append_epoch(h, epoch, g.program.bounds[-1][1], g.config.log_every, train_m, r,
                      val["loss"][r] if g.has_val else None, val["accuracy"][r] if g.has_val else None, lrs[r],
                      seconds)
    if progress:
        _print_epoch(g, epoch, train_m, val, seconds)
    return state


def _per_run(g: _Group, values: np.ndarray) -> jax.Array:
    """Per-run figures as the state's run axis takes them (a scalar without one); ``device_put`` rather than
    ``jnp.asarray``, which compiles a copy program."""
    return jax.device_put(np.asarray(values if g.meta["run_axis"] else values[0], np.float32))


def _train_epoch(g: _Group, state: TrainState, epoch: int, progress: bool) -> tuple[TrainState, dict[str, Any]]:
    """Run the epoch's chunks; return the state and the per-step training metrics [runs, steps]."""
    spe = g.program.bounds[-1][1]
    chunks = g.program.order(state.rng, epoch, g.train_index)
    bar = tqdm(total=spe, desc=f"epoch {epoch}/{g.config.epochs}", unit="step", disable=not progress, leave=False)
    metrics, finished, next_log = [], None, g.config.log_every
    for (_, end), index in zip(g.program.bounds, chunks, strict=True):
        state, m = g.program.run_chunk(state, *g.data.train, index)
        metrics.append(m)
        if progress and finished is not None:  # the bar counts finished steps; the new chunk keeps running
            jax.block_until_ready(finished[1])
            bar.update(finished[0] - bar.n)
        finished = (end, m["loss"])
        if progress and (end >= next_log or end == spe):  # metrics come back once per logging interval
            last = jax.device_get(m)
            bar.update(end - bar.n)
            bar.set_postfix(loss=f"{np.mean(last['loss']):.3f}", acc=f"{np.mean(last['accuracy']):.3f}")
            next_log += g.config.log_every
    bar.close()
    joined = jax.tree.map(lambda *xs: np.concatenate(xs, axis=-1), *jax.device_get(metrics))
    return state, {k: v.reshape(len(g.runs), spe) for k, v in joined.items()}


def _print_epoch(g: _Group, epoch: int, train_m: dict[str, Any], val: dict[str, Any], seconds: float) -> None:
    line = (f"epoch {epoch}/{g.config.epochs}: train loss {train_m['loss'].mean():.4f} "
            f"acc {train_m['accuracy'].mean():.4f} | ")
    if g.has_val:
        line += f"val loss {val['loss'].mean():.4f} acc {val['accuracy'].mean():.4f} | "
    tqdm.write(line + f"{seconds:.1f}s")


def _saves(config: TrainConfig, epoch: int) -> bool:
    """Whether epoch ``epoch`` is checkpointed: every ``checkpoint_every`` epochs and the last one."""
    return epoch % config.checkpoint_every == 0 or epoch == config.epochs


def _selection_metrics(g: _Group, histories: list[dict[str, Any]]) -> dict[str, float]:
    """The checkpoint's selection metric, named for what it is: the mean over runs of the last epoch's
    ``val_accuracy``, or ``train_accuracy`` without a validation split."""
    key = "val_accuracy" if g.has_val else "train_accuracy"
    return {key: float(np.mean([h[key][-1] for h in histories]))}


def _should_stop(config: TrainConfig, state: TrainState, epoch: int) -> bool:
    """Early stopping: every run went ``early_stopping_patience`` epochs without a better selection metric."""
    if not config.early_stopping_patience:
        return False
    best_epochs = np.asarray(jax.device_get(state.best_epoch))
    return bool(np.all(epoch - best_epochs >= config.early_stopping_patience))


def _summaries(g: _Group, state: TrainState, histories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: the best epoch and its selection accuracy, test figures of the best and the last weights."""
    n = len(g.runs)
    best_acc = np.asarray(jax.device_get(state.best_val_accuracy)).reshape(n)
    best_ep = np.asarray(jax.device_get(state.best_epoch)).reshape(n)
    last_ep = np.asarray(jax.device_get(state.epoch)).reshape(n)
    test_final = g.evaluate(g.program.evaluate, state, "test")
    same = np.array_equal(best_ep, last_ep)  # the best weights are the last ones: no second evaluation
    test_best = test_final if same else g.evaluate(g.program.evaluate_best, state, "test")
    return [{
        "best_val_accuracy": float(best_acc[r]), "best_epoch": int(best_ep[r]),
        "selected_on": "validation" if g.has_val else "training",  # training: best_val_accuracy is training's
        "test_accuracy": float(test_best["accuracy"][r]), "test_loss": float(test_best["loss"][r]),
        "final_test_accuracy": float(test_final["accuracy"][r]), "epochs_run": len(histories[r]["epoch"]),
    } for r in range(n)]


def _merged(config: TrainConfig, runs: list[dict[str, Any]], plan: RunPlan, size: int, steps: StepFns,
            results: list[FitResult]) -> FitResult:
    """One result for all groups: histories and summaries in run order, states concatenated on the run axis."""
    first = results[0]
    meta = {**first.meta, "runs": runs, "runs_per_chunk": size, "run_groups": len(results),
            "devices": plan.mesh.size, "parallel": plan.parallel,
            "startup_seconds": sum(r.meta["startup_seconds"] for r in results),
            "compile_seconds": sum(r.meta["compile_seconds"] for r in results),
            "compilations": sum(r.meta["compilations"] for r in results),
            "epoch_compilations": sum(r.meta["epoch_compilations"] for r in results)}
    histories = [h for r in results for h in r.histories]
    summaries = [s for r in results for s in r.summaries]
    state = concat_runs([r.state for r in results])
    return FitResult(config, runs, histories, summaries, state, steps, plan.run_axis, meta)


def _new_history() -> dict[str, Any]:
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")
    return {**{k: [] for k in keys}, "interval": {"step": [], "loss": [], "accuracy": []}}


def _append_epoch(h, epoch, spe, log_every, train_m, r, val_loss, val_acc, lr, seconds) -> None:
    """Append run ``r``'s epoch to its history ``h`` (validation entries None without a validation split)."""
    loss, acc = train_m["loss"][r], train_m["accuracy"][r]
    h["epoch"].append(epoch)
    h["train_loss"].append(float(loss.mean()))
    h["train_accuracy"].append(float(acc.mean()))
    h["val_loss"].append(None if val_loss is None else float(val_loss))
    h["val_accuracy"].append(None if val_acc is None else float(val_acc))
    h["lr"].append(float(lr))
    h["epoch_seconds"].append(seconds)
    for end in range(log_every, spe + 1, log_every):
        h["interval"]["step"].append((epoch - 1) * spe + end)
        h["interval"]["loss"].append(float(loss[end - log_every:end].mean()))
        h["interval"]["accuracy"].append(float(acc[end - log_every:end].mean()))


_NOT_CHECKED_ON_RESUME = {"epochs", "early_stopping_patience", "keep_checkpoints", "checkpoint_every", "log_every",
                          "run_strategy", "runs_per_chunk", "devices"}


def _check_resumable(saved: dict[str, Any], meta: dict[str, Any], directory: str) -> None:
    """Refuse a checkpoint written by another config or other runs."""
    old = {k: v for k, v in saved["config"].items() if k not in _NOT_CHECKED_ON_RESUME}
    new = {k: v for k, v in meta["config"].items() if k not in _NOT_CHECKED_ON_RESUME}
    if _jsonable(old) != _jsonable(new) or _jsonable(saved["runs"]) != _jsonable(meta["runs"]):
        raise ConfigError(f"the checkpoint in {directory} was written by a different config: use a new output "
                          f"directory, or resume=False to start over")


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x))
