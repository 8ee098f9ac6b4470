"""A group of runs trained together in one compiled program: what stays fixed while it trains, and the
per-run figures read off its state (divergence, the selection metric, the final summaries)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcifar.errors import TrainingError
from jaxcifar.train.checkpoint import Saver
from jaxcifar.train.components import Components, recorded_config
from jaxcifar.train.config import TrainConfig
from jaxcifar.train.fingerprint import tree_signature
from jaxcifar.train.history import summary
from jaxcifar.train.parallel import replicate, shard_runs
from jaxcifar.train.plan import RunPlan
from jaxcifar.train.program import EpochProgram, EvalPlan, eval_plans
from jaxcifar.train.setup import PreparedData, init_state, run_splits, with_body
from jaxcifar.train.state import TrainState, stack_states
from jaxcifar.train.steps import StepFns
from jaxcifar.versions import environment


@dataclass(frozen=True)
class Group:
    """What stays fixed while a group of runs trains: its program, data, evaluation batches, checkpoints."""

    config: TrainConfig
    data: PreparedData
    program: EpochProgram
    runs: list[dict[str, Any]]
    run_ids: list[int]  # the runs' indices in fit(runs=...)
    initial: TrainState  # fresh (or fine-tuning) state, placed on the devices
    train_index: jax.Array | None  # per-run training indices when each run has its own split
    eval_plans: dict[str, EvalPlan]
    checkpoint_dir: str | None
    meta: dict[str, Any]

    @property
    def has_val(self) -> bool:
        """Whether there is a validation split; without one the best epoch is picked on training metrics."""
        return self.data.val is not None

    @property
    def has_ema(self) -> bool:
        """Whether the runs keep a moving average of their weights."""
        return self.config.ema_decay is not None

    @property
    def steps_per_epoch(self) -> int:
        return self.program.bounds[-1][1]

    @classmethod
    def start(cls, config: TrainConfig, data: PreparedData, steps: StepFns, program: EpochProgram,
              plan: RunPlan, members: list[int], all_runs: list[dict[str, Any]], checkpoint_dir: str | None,
              body: dict[str, Any] | None, components: Components) -> Group:
        """Initialize the group's runs (``members`` of ``all_runs``, placed on the plan's devices) and their
        splits."""
        runs = [all_runs[i] for i in members]
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
        described = {**components.describe(), "fingerprints": components.fingerprints(steps.tx, config)}
        meta = {"config": recorded_config(config, components), "runs": runs, "fine_tuned": body is not None,
                "components": described, "opt_state": tree_signature(state.opt_state), "loop": plan.loop,
                "chunk": program.bounds[0][1], "run_axis": plan.run_axis, "run_strategy": plan.strategy,
                "normalization": {"mean": data.mean, "std": data.std}, "num_classes": data.num_classes,
                "train_size": data.train_size, "split_per_run": bool(data.per_run_val),
                "environment": environment()}
        return cls(config, data, program, runs, members, state, train_index, plans, checkpoint_dir, meta)

    def evaluate(self, state: TrainState, split: str, weights: str = "current") -> dict[str, np.ndarray]:
        """``state``'s ``weights`` (``"current"``, ``"best"`` or ``"ema"``) over ``split`` (``"val"`` or
        ``"test"``), per run."""
        fn, (images, labels) = ((self.program.evaluate_val, self.data.val) if split == "val"
                                else (self.program.evaluate, self.data.test))
        out = jax.device_get(fn(state.weights(weights), images, labels, *self.eval_plans[split]))
        return {k: np.asarray(v, np.float32).reshape(len(self.runs)) for k, v in out.items()}

    def check_divergence(self, state: TrainState, epoch: int, saver: Saver | None, progress: bool) -> np.ndarray:
        """Which runs have diverged (bool [runs]). A single run that diverged in ``epoch`` stops training
        with an error saying how to go on; in a sweep each newly diverged run is reported in one line and stays
        frozen while the others train on."""
        diverged_at = np.asarray(jax.device_get(state.diverged_at)).reshape(len(self.runs))
        newly = [r for r in range(len(self.runs)) if diverged_at[r] == epoch]
        if newly and not self.meta["run_axis"]:
            fix, cli = self._how_to_go_on(saver)
            problem = f"the loss became NaN/inf in epoch {epoch}: "
            raise TrainingError(problem + fix, cli=problem + cli)
        for r in newly:
            if progress:
                tqdm.write(f"run {self.run_ids[r]} {self.runs[r]} diverged (NaN/inf) in epoch {epoch}: its weights "
                           "get no further updates; the other runs go on")
        return diverged_at > 0

    def _how_to_go_on(self, saver: Saver | None) -> tuple[str, str]:
        """The advice after a single run diverged, for the library and for the command line: continue from its
        last checkpoint (finished first: it may still be saving) with a lower learning rate or gradient
        clipping, or start over with them when it has none."""
        last = None
        if saver is not None:
            saver.finish()
            last = saver.manager.latest_step()
        if last is None:
            advice = "no checkpoint was saved before it; lower the learning rate or set grad_clip_norm and start over"
            return f"{advice} (config.replace(learning_rate=..., grad_clip_norm=1.0))", \
                f"{advice} (--set learning_rate=... / --set grad_clip_norm=1)"
        advice = (f"the last good checkpoint is epoch {last} in {self.checkpoint_dir}; go on from it with a lower "
                  "learning rate or gradient clipping: ")
        return (advice + "fit(config.replace(learning_rate=...), ..., resume=ResumeFrom(allow_changes="
                "('learning_rate', 'grad_clip_norm')))", advice + "rerun with --allow-config-change "
                "learning_rate,grad_clip_norm --set learning_rate=...")

    def selection_metrics(self, histories: list[dict[str, Any]]) -> dict[str, float]:
        """The checkpoint's selection metric, named for what it is: the mean over runs of the last epoch's
        ``val_accuracy``, or ``train_accuracy`` without a validation split."""
        key = "val_accuracy" if self.has_val else "train_accuracy"
        return {key: float(np.mean([h[key][-1] for h in histories]))}

    def summaries(self, state: TrainState, histories: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per run: the best epoch and its selection accuracy, test figures of the best, the last and the
        averaged weights."""
        n = len(self.runs)
        best_acc = np.asarray(jax.device_get(state.best_val_accuracy)).reshape(n)
        best_ep = np.asarray(jax.device_get(state.best_epoch)).reshape(n)
        last_ep = np.asarray(jax.device_get(state.epoch)).reshape(n)
        test_final = self.evaluate(state, "test")
        same = np.array_equal(best_ep, last_ep)  # the best weights are the last ones: no second evaluation
        test_best = test_final if same else self.evaluate(state, "test", "best")
        test_ema = self.evaluate(state, "test", "ema") if self.has_ema else None
        diverged_at = np.asarray(jax.device_get(state.diverged_at)).reshape(n)
        return [summary(float(best_acc[r]), int(best_ep[r]), self.has_val, run_figures(test_best, r),
                        run_figures(test_final, r), test_ema and run_figures(test_ema, r),
                        len(histories[r]["epoch"]), int(diverged_at[r]))
                for r in range(n)]


def run_figures(figures: dict[str, np.ndarray], r: int) -> dict[str, float]:
    """Run ``r``'s entry of per-run figures."""
    return {k: float(v[r]) for k, v in figures.items()}
