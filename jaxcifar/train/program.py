"""The compiled program of one epoch: every jitted piece ``fit`` calls, for one group of runs.

An :class:`EpochProgram` is built once per program (see :func:`cached`) from the step functions and the
run plan. ``fit`` compiles it ahead of time (:meth:`EpochProgram.precompile`: ``lower().compile()`` fills
jit's cache, so the epochs compile nothing) and then only calls it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxcifar.data.augment import augment_functions
from jaxcifar.data.batching import epoch_batches, eval_batches
from jaxcifar.models import MODELS
from jaxcifar.train.components import Components, cache_identity
from jaxcifar.train.config import TrainConfig
from jaxcifar.train.plan import RunPlan
from jaxcifar.train.runs import over_runs, program_bytes
from jaxcifar.train.setup import PreparedData
from jaxcifar.train.state import DATA_STREAM, TrainState
from jaxcifar.train.steps import StepFns, make_chunk_runner, make_evaluator

EvalPlan = tuple[jax.Array, jax.Array]  # (index int32 [S, B], weight float32 [S, B]) over a split


@dataclass(frozen=True)
class EpochProgram:
    """The jitted pieces of an epoch for ``n_runs`` runs (``None``: a single run, no run axis).

    * ``run_chunk(state, images, labels, index [.., K, B]) -> (state, metrics [.., K])``: K train steps
      (the state is donated);
    * ``order(rng, epoch, train_index) -> (index [.., K, B], ...)``: the epoch's batches, one array per chunk
      (cut inside the program, so the epoch loop runs no eager op that would compile);
    * ``evaluate`` / ``evaluate_val(variables, images, labels, index, weight) -> {loss, accuracy}``: the test
      split and the validation split (per-run indices when each run has its own split) with the given weights
      (``state.weights("current" | "best" | "ema")``: one program serves all three, which share their shapes);
    * ``end_epoch(state, val_loss, val_accuracy) -> state`` and ``current_lr(state) -> lr``.
    """

    run_chunk: Callable
    order: Callable
    evaluate: Callable
    evaluate_val: Callable
    end_epoch: Callable
    current_lr: Callable
    bounds: tuple[tuple[int, int], ...]  # (first, end) step of each chunk in an epoch
    n_runs: int | None
    batch_size: int

    def precompile(self, state: TrainState, data: PreparedData, train_index: jax.Array | None,
                   eval_plans: dict[str, EvalPlan]) -> None:
        """Compile every piece for these arguments' shapes (each distinct chunk length once)."""
        chunks = self.order(state.rng, 1, train_index)
        for length in sorted({hi - lo for lo, hi in self.bounds}):
            index = next(c for c in chunks if c.shape[-2] == length)
            self.run_chunk.lower(state, *data.train, index).compile()
        # the best and the averaged weights have the current ones' shapes: these programs serve them too
        if data.val is not None:
            self.evaluate_val.lower(state.variables, *data.val, *eval_plans["val"]).compile()
        self.evaluate.lower(state.variables, *data.test, *eval_plans["test"]).compile()
        per_run = jnp.zeros(() if self.n_runs is None else (self.n_runs,), jnp.float32)
        self.end_epoch.lower(state, per_run, per_run).compile()
        self.current_lr.lower(state).compile()

    def chunk_bytes(self, state: Any, data: PreparedData) -> int:
        """Peak memory of the training chunk for ``state`` (arrays or shapes), from XLA's analysis of the
        compiled program; the compilation is the one the epochs will use (jit's cache keeps it)."""
        lead = () if self.n_runs is None else (self.n_runs,)
        index = jax.ShapeDtypeStruct((*lead, self.bounds[0][1], self.batch_size), jnp.int32)
        return program_bytes(self.run_chunk.lower(state, *data.train, index).compile())


def build_program(config: TrainConfig, data: PreparedData, steps: StepFns, plan: RunPlan,
                  n_runs: int) -> EpochProgram:
    """The epoch program for a group of ``n_runs`` runs of ``plan`` (a plain single run without a run axis)."""
    axis = plan.run_axis
    vm = (lambda f, axes: over_runs(f, axes, plan.strategy)) if axis else (lambda f, axes: f)  # noqa: E731
    n_train = data.train_size

    bounds = plan.bounds(n_runs)

    def order(rng, epoch, train_index=None):
        """This epoch's batches, cut into chunks; with a per-run split, positions in the run's ``train_index``."""
        idx = epoch_batches(jax.random.fold_in(jax.random.fold_in(rng, DATA_STREAM), epoch), n_train,
                            config.batch_size)
        idx = idx if train_index is None else train_index[idx]
        return tuple(idx[lo:end] for lo, end in bounds)

    runner = make_chunk_runner(steps, unroll=True if plan.loop == "unrolled" else 1, freeze_diverged=plan.run_axis)
    per_run_val = 0 if data.per_run_val else None
    return EpochProgram(
        run_chunk=jax.jit(vm(runner, (0, None, None, 0)), donate_argnums=0),
        order=jax.jit(jax.vmap(order, (0, None, 0)) if axis else order),
        evaluate=jax.jit(vm(make_evaluator(steps), (0, None, None, None, None))),
        evaluate_val=jax.jit(vm(make_evaluator(steps), (0, None, None, per_run_val, None))),
        end_epoch=jax.jit(vm(steps.end_epoch, (0, 0, 0))),
        current_lr=jax.jit(vm(steps.current_lr, (0,))),
        bounds=bounds,
        n_runs=n_runs if axis else None,
        batch_size=config.batch_size,
    )


def eval_plans(data: PreparedData, batch_size: int) -> dict[str, EvalPlan]:
    """Fixed-size evaluation batches over the validation (if any) and test splits; padding has weight 0."""
    sizes = {"test": int(data.test[1].shape[0])}
    if data.val is not None:
        sizes["val"] = data.per_run_val or int(data.val[1].shape[0])
    return {name: tuple(map(jnp.asarray, eval_batches(size, batch_size))) for name, size in sizes.items()}


# Config fields the compiled programs do not depend on.
NOT_IN_PROGRAM = ("seed", "split_seed", "keep_checkpoints", "checkpoint_every", "early_stopping_patience",
                  "log_every", "runs_per_chunk")


def program_key(config: TrainConfig, data: PreparedData, plan: RunPlan, components: Components) -> tuple:
    """Everything the compiled programs depend on (the data only through its shapes and statistics), including
    the identity of every function and class involved: the registered model factory (a model class redefined or
    re-registered under the same name gets a new program instead of silently training the old one), the
    augmentations (registered and given as functions) and the user's model, optimizer, loss and metrics."""
    program = {k: v for k, v in config.to_json_dict().items() if k not in NOT_IN_PROGRAM}
    functions = (MODELS.get(config.model), *augment_functions(config.augment))
    return (json.dumps(program, sort_keys=True, default=str), tuple(map(cache_identity, functions)),
            components.identity(), data.mean, data.std,
            data.num_classes, data.train_size, data.per_run_val, data.val is not None and int(data.val[1].shape[0]),
            int(data.test[1].shape[0]), tuple(d.id for d in plan.mesh.devices.flat), plan.backend,
            plan.strategy, plan.loop, plan.max_chunk, plan.parallel)


class ProgramCache:
    """Built programs by key, oldest dropped beyond ``size``: a second ``fit`` of the same program (another
    seed, a timed series of runs) neither traces nor compiles again."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: dict[Any, Any] = {}

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``key``."""
        if key not in self._items:
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[key] = make()
        return self._items[key]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


PROGRAMS = ProgramCache()


def clear_program_cache() -> None:
    """Forget every built program (the next ``fit`` traces and compiles again)."""
    PROGRAMS.clear()
