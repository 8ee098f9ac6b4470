"""Training: config, optimizers, pure steps, the canonical ``fit`` loop and Orbax checkpoints."""

from jaxcifar.train.checkpoint import checkpoint_manager, load_body, restore
from jaxcifar.train.config import TrainConfig, validate_config
from jaxcifar.train.loop import RUN_KEYS, FitResult, fit
from jaxcifar.train.optim import make_optimizer, make_plateau, unit_schedule
from jaxcifar.train.setup import PreparedData, build, init_state, prepare_data
from jaxcifar.train.state import TrainState, learning_rate, stack_states, unstack_state
from jaxcifar.train.steps import StepFns, make_chunk_runner, make_evaluator

__all__ = [
    "RUN_KEYS", "FitResult", "PreparedData", "StepFns", "TrainConfig", "TrainState", "build",
    "checkpoint_manager", "fit", "init_state", "learning_rate", "load_body", "make_chunk_runner",
    "make_evaluator", "make_optimizer", "make_plateau", "prepare_data", "restore", "stack_states",
    "unit_schedule", "unstack_state", "validate_config",
]
