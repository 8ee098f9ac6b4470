"""``fit``: the one training loop every experiment uses.

Data stays on the device as uint8; each epoch is a device-side permutation cut into chunks of compiled
steps (the whole epoch as one ``lax.scan`` on GPU/TPU, unrolled chunks of ``config.unroll`` steps on
CPU). With ``runs`` the same program is ``jax.vmap``-ed over a leading run axis: each run has its own
seed (init, dropout, data order, augmentation) and hyper-parameters (dropout rate, learning rate,
weight decay), all trained at once in one compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxcifar.data import Dataset
from jaxcifar.data.batching import epoch_batches, eval_batches, steps_per_epoch
from jaxcifar.errors import ConfigError, TrainingError
from jaxcifar.train import checkpoint as ckpt
from jaxcifar.train.config import TrainConfig, validate_config
from jaxcifar.train.optim import unit_schedule
from jaxcifar.train.parallel import check_batch, data_mesh, parallel_mode, replicate, shard_runs
from jaxcifar.train.runs import (
    choose_runs_per_chunk,
    concat_runs,
    memory_budget,
    over_runs,
    program_bytes,
    resolve_strategy,
)
from jaxcifar.train.setup import (
    PreparedData,
    build,
    init_state,
    prepare_data,
    resolve_loop,
    run_splits,
    with_body,
)
from jaxcifar.train.state import DATA_STREAM, TrainState, learning_rate, stack_states
from jaxcifar.train.steps import StepFns, make_chunk_runner, make_evaluator
from jaxcifar.versions import environment

__all__ = ["RUN_KEYS", "FitResult", "PreparedData", "build", "fit", "init_state", "prepare_data"]

RUN_KEYS = ("seed", "dropout_rate", "learning_rate", "weight_decay")


@dataclass
class FitResult:
    """What :func:`fit` returns: per-run histories and summaries, the final state and the step functions."""

    config: TrainConfig
    runs: list[dict[str, Any]]
    histories: list[dict[str, Any]]
    summaries: list[dict[str, Any]]
    state: TrainState
    fns: StepFns
    vmapped: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def history(self) -> dict[str, Any]:
        return self.histories[0]

    @property
    def summary(self) -> dict[str, Any]:
        return self.summaries[0]


def _check_runs(config: TrainConfig, runs: Sequence[dict[str, Any]]) -> None:
    if not runs:
        raise ConfigError("runs is empty: give at least one run, or runs=None for a single run")
    for r in runs:
        unknown = set(r) - set(RUN_KEYS)
        if unknown:
            raise ConfigError(f"run axis {sorted(unknown)} is not supported: vary only {list(RUN_KEYS)}")
        validate_config(config.replace(**{k: v for k, v in r.items() if k != "seed"}))


def _end_of_epoch(plateau_tx):
    def end(state: TrainState, val_loss, val_acc) -> TrainState:
        improved = val_acc > state.best_val_accuracy
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(improved, a, b), new, old)  # noqa: E731
        plateau = state.plateau
        if plateau_tx is not None:
            _, plateau = plateau_tx.update(jnp.zeros(()), plateau, value=val_loss)
        epoch = state.epoch + 1
        return state.replace(
            best_params=pick(state.params, state.best_params),
            best_batch_stats=pick(state.batch_stats, state.best_batch_stats),
            best_val_accuracy=jnp.maximum(val_acc, state.best_val_accuracy),
            best_epoch=jnp.where(improved, epoch, state.best_epoch), epoch=epoch, plateau=plateau)

    return end


def _new_history() -> dict[str, Any]:
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")
    return {**{k: [] for k in keys}, "interval": {"step": [], "loss": [], "accuracy": []}}


def fit(
    config: TrainConfig,
    dataset: Dataset | PreparedData,
    *,
    runs: Sequence[dict[str, Any]] | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch_end: Callable[[int, list[dict[str, Any]]], None] | None = None,
    body: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``config`` on ``dataset``; with ``runs`` (a list of per-run overrides, see :data:`RUN_KEYS`)
    train them all at once in one compiled program (``config.run_strategy``), ``config.runs_per_chunk`` runs
    at a time (default: as many as fit in memory). Checkpoints every epoch into ``checkpoint_dir`` (one
    sub-directory per group of runs when there are several groups) and resumes from the latest checkpoint
    when ``resume``. ``on_epoch_end(epoch, histories)`` is called after each saved epoch. ``body`` (trained
    ``{"params", "batch_stats"}``, e.g. ``load_trained(dir).variables``) fine-tunes: every module but the
    classifier ``head`` starts from it.
    """
    validate_config(config)
    vmapped = runs is not None
    runs = [dict(r) for r in runs] if vmapped else [{}]
    _check_runs(config, runs)
    data = dataset if isinstance(dataset, PreparedData) else prepare_data(dataset, config,
                                                                           vmapped and config.split_per_run)
    validate_config(config, train_size=data.train_size)
    mesh = data_mesh(config.devices)
    strategy = resolve_strategy(config.run_strategy) if vmapped else "single"
    group = len(runs) if not vmapped else config.runs_per_chunk
    if (group is None and mesh.size > 1 and config.parallel != "data" and strategy == "vmap"
            and len(runs) % mesh.size == 0):
        group = len(runs)  # the run axis is sharded: each device holds len(runs) / devices of them
    mode = parallel_mode(config.parallel, mesh, strategy,
                         [len(runs[i:i + group]) for i in range(0, len(runs), group)] if group else [len(runs)])
    if mode == "data":
        check_batch(config.batch_size, mesh)
    if mesh.size > 1:  # the dataset is replicated; the state too for "data", split by runs for "runs"
        data = dataclasses.replace(data, **{k: None if getattr(data, k) is None else replicate(getattr(data, k), mesh)
                                            for k in ("train", "val", "test")})
    key = _program_key(config, data, mesh)
    fns, _, plateau_tx = _cached(("build", key, mode), lambda: build(config, data, mesh if mode == "data" else None))
    group = group or choose_runs_per_chunk(
        len(runs), lambda g: _group_bytes(config, data, fns, plateau_tx, runs[:g], strategy), memory_budget())
    groups = [runs[i:i + group] for i in range(0, len(runs), group)]
    results = []
    for g, group_runs in enumerate(groups):
        sub = checkpoint_dir
        if checkpoint_dir and len(groups) > 1:
            sub = f"{checkpoint_dir}/runs_{g * group:04d}-{g * group + len(group_runs) - 1:04d}"
        done = [h for r in results for h in r.histories]
        hook = on_epoch_end and (lambda e, hs, done=done: on_epoch_end(e, done + hs))
        results.append(_fit_group(config, data, fns, plateau_tx, group_runs, vmapped, strategy, sub, resume,
                                  progress, hook, body, mesh if mode == "data" else None,
                                  mesh if mode == "runs" else None))
    meta = {**results[0].meta, "runs": runs, "runs_per_chunk": group, "run_groups": len(groups),
            "devices": mesh.size, "parallel": mode}
    return FitResult(config, runs, [h for r in results for h in r.histories],
                     [s for r in results for s in r.summaries], concat_runs([r.state for r in results]), fns,
                     vmapped, meta)


_NOT_IN_PROGRAM = ("seed", "split_seed", "keep_checkpoints", "early_stopping_patience", "log_every",
                   "runs_per_chunk")  # config fields the compiled programs do not depend on
_PROGRAMS: dict[Any, Any] = {}  # program key -> built/jitted functions (insertion-ordered, oldest dropped)


def _cached(key: Any, make: Callable[[], Any], size: int = 16) -> Any:
    """``make()`` once per ``key``: a second ``fit`` of the same program reuses the traced and compiled
    functions instead of compiling again (what a timed series of runs needs)."""
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= size:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = make()
    return _PROGRAMS[key]


def _program_key(config: TrainConfig, data: PreparedData, mesh: Mesh) -> tuple:
    """Everything the compiled programs depend on (the data only through its shapes and statistics)."""
    program = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_PROGRAM}
    return (json.dumps(program, sort_keys=True, default=str), data.mean, data.std, data.num_classes,
            data.train_size, data.per_run_val, data.val is not None and int(data.val[1].shape[0]),
            int(data.test[1].shape[0]), tuple(d.id for d in mesh.devices.flat), jax.default_backend())


def _compiled_fns(config: TrainConfig, data: PreparedData, fns: StepFns, plateau_tx, n_runs: int, vmapped: bool,
                  strategy: str) -> dict[str, Any]:
    """The jitted pieces of one epoch for a group of ``n_runs`` runs (a plain single run if not ``vmapped``),
    built once per program (see :func:`_cached`)."""
    mesh = data_mesh(config.devices)
    key = ("fns", _program_key(config, data, mesh), n_runs, vmapped, strategy, fns.batch_sharding is not None)
    return _cached(key, lambda: _make_compiled_fns(config, data, fns, plateau_tx, n_runs, vmapped, strategy))


def _make_compiled_fns(config: TrainConfig, data: PreparedData, fns: StepFns, plateau_tx, n_runs: int,
                       vmapped: bool, strategy: str) -> dict[str, Any]:
    n_train = data.train_size
    spe = steps_per_epoch(n_train, config.batch_size)
    loop, chunk = resolve_loop(config)
    if loop == "scan":
        chunk = spe
    elif strategy == "loop":  # the runs are traced one after another: keep the program's step count
        chunk = max(1, chunk // n_runs)
    chunk = min(chunk, spe)
    vm = (lambda f, axes: over_runs(f, axes, strategy)) if vmapped else (lambda f, axes: f)  # noqa: E731

    def order(rng, epoch, train_index=None):
        """This epoch's batches; with a per-run split, positions in the run's ``train_index``."""
        idx = epoch_batches(jax.random.fold_in(jax.random.fold_in(rng, DATA_STREAM), epoch), n_train,
                            config.batch_size)
        return idx if train_index is None else train_index[idx]

    runner = make_chunk_runner(fns, unroll=True if loop == "unrolled" else 1)
    evaluator = (0, None, None, None, None)
    return {
        "loop": loop, "chunk": chunk, "spe": spe,
        "run_chunk": jax.jit(vm(runner, (0, None, None, 0)), donate_argnums=0),
        "epoch_order": jax.jit(jax.vmap(order, (0, None, 0)) if vmapped else order),
        "evaluate": jax.jit(vm(make_evaluator(fns), evaluator)),
        "evaluate_val": jax.jit(vm(make_evaluator(fns), (0, None, None, 0 if data.per_run_val else None, None))),
        "evaluate_best": jax.jit(vm(make_evaluator(fns, use_best=True), evaluator)),
        "end_epoch": jax.jit(vm(_end_of_epoch(plateau_tx), (0, 0, 0))),
        "current_lr": jax.jit(vm(lambda s: learning_rate(s) * unit_schedule(config, spe)(s.step), (0,))),
    }


def _group_bytes(config, data, fns, plateau_tx, runs, strategy) -> int:
    """Memory of the training program for this group of runs, from XLA's analysis of the compiled chunk."""
    c = _compiled_fns(config, data, fns, plateau_tx, len(runs), True, strategy)
    state = jax.eval_shape(lambda: stack_states([init_state(config, fns, plateau_tx, r) for r in runs]))
    index = jax.ShapeDtypeStruct((len(runs), c["chunk"], config.batch_size), jnp.int32)
    return program_bytes(c["run_chunk"].lower(state, *data.train, index).compile())


def _precompile(c: dict[str, Any], state: TrainState, data: PreparedData, bounds, plans, n_runs: int | None,
                train_index: jax.Array | None):
    """Compile every jitted piece of an epoch ahead of time (``jit`` then serves the calls from its cache),
    so epoch times measure training alone and ``meta['compile_seconds']`` the compilation."""
    index = c["epoch_order"](state.rng, 1, train_index)
    for length in sorted({hi - lo for lo, hi in bounds}):
        c["run_chunk"].lower(state, *data.train, index[..., :length, :]).compile()
    if data.val is not None:
        c["evaluate_val"].lower(state, *data.val, *plans["val"]).compile()
    c["evaluate"].lower(state, *data.test, *plans["test"]).compile()
    c["evaluate_best"].lower(state, *data.test, *plans["test"]).compile()
    per_run = jnp.zeros(() if n_runs is None else (n_runs,), jnp.float32)
    c["end_epoch"].lower(state, per_run, per_run).compile()
    c["current_lr"].lower(state).compile()


def _fit_group(config, data, fns, plateau_tx, runs, vmapped, strategy, checkpoint_dir, resume, progress,
               on_epoch_end, body, data_parallel: Mesh | None, run_parallel: Mesh | None) -> FitResult:
    c = _compiled_fns(config, data, fns, plateau_tx, len(runs), vmapped, strategy)
    loop, chunk, spe = c["loop"], c["chunk"], c["spe"]
    states = [init_state(config, fns, plateau_tx, r, data.train[0]) for r in runs]
    if body is not None:
        states = [with_body(s, body) for s in states]
    state = stack_states(states) if vmapped else states[0]
    if data_parallel is not None and data_parallel.size > 1:
        state = replicate(state, data_parallel)
    elif run_parallel is not None and run_parallel.size > 1:
        state = shard_runs(state, run_parallel)
    bounds = [(lo, min(lo + chunk, spe)) for lo in range(0, spe, chunk)]
    plans = {name: tuple(map(jnp.asarray, eval_batches(size, config.eval_batch_size)))
             for name, size in (("val", data.val and (data.per_run_val or int(data.val[1].shape[0]))),
                                ("test", int(data.test[1].shape[0]))) if size}
    splits = run_splits(data, [int(r.get("seed", config.seed)) for r in runs])
    train_index = None
    if splits is not None:  # per-run validation sets: evaluation indices go through each run's own index
        train_index, val_index = (x if vmapped else x[0] for x in splits)
        plans["val"] = (val_index[..., plans["val"][0]], plans["val"][1])

    def eval_split(fn, name):
        split = data.val if name == "val" else data.test
        return jax.device_get(c[fn](state, split[0], split[1], *plans[name]))

    histories = [_new_history() for _ in runs]
    meta = {"config": config.to_dict(), "runs": runs, "fine_tuned": body is not None, "loop": loop, "chunk": chunk,
            "vmapped": vmapped,
            "run_strategy": strategy, "normalization": {"mean": data.mean, "std": data.std},
            "num_classes": data.num_classes, "train_size": data.train_size, "split_per_run": bool(data.per_run_val),
            "environment": environment()}
    manager = ckpt.checkpoint_manager(checkpoint_dir, config.keep_checkpoints) if checkpoint_dir else None
    if manager is not None and resume and manager.latest_step() is not None:
        state, saved = ckpt.restore(checkpoint_dir, state, "latest")
        _check_resumable(saved, meta, checkpoint_dir)
        histories = saved["histories"]
    start_epoch = int(np.max(jax.device_get(state.epoch)))
    if progress and start_epoch:
        tqdm.write(f"resuming after epoch {start_epoch} from {checkpoint_dir} (--no-resume starts over)")

    has_val = data.val is not None  # without a validation split, the best epoch is picked on training metrics
    t0 = time.perf_counter()
    if start_epoch < config.epochs:
        _precompile(c, state, data, bounds, plans, len(runs) if vmapped else None, train_index)
    compile_seconds = time.perf_counter() - t0
    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        order_idx = c["epoch_order"](state.rng, epoch, train_index)
        chunk_metrics = []
        bar = tqdm(total=spe, desc=f"epoch {epoch}/{config.epochs}", unit="step", disable=not progress, leave=False)
        next_log, finished = config.log_every, None
        for lo, done in bounds:
            state, m = c["run_chunk"](state, data.train[0], data.train[1], order_idx[..., lo:done, :])
            chunk_metrics.append(m)
            if progress and finished is not None:  # the bar counts finished steps; the new chunk keeps running
                jax.block_until_ready(finished[1])
                bar.update(finished[0] - bar.n)
            finished = (done, m["loss"])
            if done >= next_log or done == spe:  # metrics come back once per logging interval
                last = jax.device_get(m)
                bar.update(done - bar.n)
                bar.set_postfix(loss=f"{np.mean(last['loss']):.3f}", acc=f"{np.mean(last['accuracy']):.3f}")
                next_log += config.log_every
        bar.close()
        train_m = jax.device_get(jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-1), *chunk_metrics))
        train_m = {k: np.asarray(v).reshape(len(runs), spe) for k, v in train_m.items()}
        if has_val:
            val_m = eval_split("evaluate_val", "val")
        else:
            val_m = {"loss": train_m["loss"].mean(-1), "accuracy": train_m["accuracy"].mean(-1)}
        val_loss = np.asarray(val_m["loss"], np.float32).reshape(len(runs))
        val_acc = np.asarray(val_m["accuracy"], np.float32).reshape(len(runs))
        if not (np.isfinite(train_m["loss"]).all() and np.isfinite(val_loss).all()):
            where = f"; last good checkpoint kept in {checkpoint_dir}" if manager else ""
            raise TrainingError(f"loss became NaN/inf in epoch {epoch}: lower the learning rate or set "
                                f"grad_clip_norm{where}")
        state = c["end_epoch"](state, jnp.asarray(val_loss if vmapped else val_loss[0]),
                               jnp.asarray(val_acc if vmapped else val_acc[0]))
        lrs = np.asarray(jax.device_get(c["current_lr"](state))).reshape(len(runs))
        seconds = time.perf_counter() - t0
        for r, h in enumerate(histories):
            _append_epoch(h, epoch, spe, config.log_every, train_m, r, val_loss[r] if has_val else None,
                          val_acc[r] if has_val else None, lrs[r], seconds)
        if progress:
            tqdm.write(f"epoch {epoch}/{config.epochs}: train loss {train_m['loss'].mean():.4f} "
                       f"acc {train_m['accuracy'].mean():.4f} | "
                       + (f"val loss {val_loss.mean():.4f} acc {val_acc.mean():.4f} | " if has_val else "")
                       + f"{seconds:.1f}s")
        if manager is not None:
            ckpt.save(manager, epoch, state, {**meta, "histories": histories}, float(val_acc.mean()))
        if on_epoch_end is not None:
            on_epoch_end(epoch, histories)
        best_epochs = np.asarray(jax.device_get(state.best_epoch)).reshape(len(runs))
        if config.early_stopping_patience and np.all(epoch - best_epochs >= config.early_stopping_patience):
            break

    best_acc = np.asarray(jax.device_get(state.best_val_accuracy)).reshape(len(runs))
    best_ep = np.asarray(jax.device_get(state.best_epoch)).reshape(len(runs))
    test_final = eval_split("evaluate", "test")  # best == last weights when every run's best is its last epoch
    last = np.asarray(jax.device_get(state.epoch)).reshape(len(runs))
    test_best = test_final if np.array_equal(best_ep, last) else eval_split("evaluate_best", "test")
    summaries = []
    for r in range(len(runs)):
        pick = lambda m, k: float(np.asarray(m[k]).reshape(len(runs))[r])  # noqa: E731, B023
        summaries.append({
            "best_val_accuracy": float(best_acc[r]), "best_epoch": int(best_ep[r]),
            "selected_on": "validation" if has_val else "training",  # training: best_val_accuracy is training's
            "test_accuracy": pick(test_best, "accuracy"), "test_loss": pick(test_best, "loss"),
            "final_test_accuracy": pick(test_final, "accuracy"), "epochs_run": len(histories[r]["epoch"]),
        })
    meta["compile_seconds"] = compile_seconds
    return FitResult(config, runs, histories, summaries, state, fns, vmapped, meta)


def _append_epoch(h, epoch, spe, log_every, train_m, r, val_loss, val_acc, lr, seconds) -> None:
    loss, acc = train_m["loss"][r], train_m["accuracy"][r]
    h["epoch"].append(epoch)
    h["train_loss"].append(float(loss.mean()))
    h["train_accuracy"].append(float(acc.mean()))
    h["val_loss"].append(None if val_loss is None else float(val_loss))  # None: no validation split
    h["val_accuracy"].append(None if val_acc is None else float(val_acc))
    h["lr"].append(float(lr))
    h["epoch_seconds"].append(seconds)
    for end in range(log_every, spe + 1, log_every):
        h["interval"]["step"].append((epoch - 1) * spe + end)
        h["interval"]["loss"].append(float(loss[end - log_every:end].mean()))
        h["interval"]["accuracy"].append(float(acc[end - log_every:end].mean()))


def _check_resumable(saved: dict[str, Any], meta: dict[str, Any], directory: str) -> None:
    ignore = {"epochs", "early_stopping_patience", "keep_checkpoints", "log_every", "run_strategy",
              "runs_per_chunk", "devices"}
    old = {k: v for k, v in saved["config"].items() if k not in ignore}
    new = {k: v for k, v in meta["config"].items() if k not in ignore}
    if _jsonable(old) != _jsonable(new) or _jsonable(saved["runs"]) != _jsonable(meta["runs"]):
        raise ConfigError(f"the checkpoint in {directory} was written by a different config: use a new output "
                          f"directory, or resume=False to start over")


def _jsonable(x):
    import json

    return json.loads(json.dumps(x))
