"""Training: config, optimizers, losses, pure steps, the run plan, the epoch program, the canonical ``fit`` loop,
callbacks and metric writers, Orbax checkpoints and loading a trained model."""

from jaxcifar.train.callbacks import Callback, Event, JsonlWriter, ProfileTrace, Start, TensorBoardWriter
from jaxcifar.train.checkpoint import checkpoint_manager, load_body, restore
from jaxcifar.train.compilation import CompileClock, enable_compile_cache
from jaxcifar.train.components import Components
from jaxcifar.train.config import TrainConfig, validate_config
from jaxcifar.train.loop import RUN_KEYS, FitResult, fit
from jaxcifar.train.losses import cross_entropy
from jaxcifar.train.optim import make_optimizer, make_plateau, unit_schedule
from jaxcifar.train.plan import RunPlan, make_plan
from jaxcifar.train.predict import Trained, load_sweep, load_trained
from jaxcifar.train.program import EpochProgram, build_program, clear_program_cache
from jaxcifar.train.resume import ResumeFrom
from jaxcifar.train.setup import PreparedData, build, init_state, prepare_data
from jaxcifar.train.state import TrainState, stack_states, unstack_state
from jaxcifar.train.steps import StepFns, make_chunk_runner, make_evaluator

__all__ = [
    "RUN_KEYS", "Callback", "CompileClock", "Components", "EpochProgram", "Event", "FitResult", "JsonlWriter",
    "PreparedData", "ProfileTrace", "ResumeFrom", "RunPlan", "Start", "StepFns", "TensorBoardWriter", "TrainConfig",
    "TrainState", "Trained", "build", "build_program", "checkpoint_manager", "clear_program_cache", "cross_entropy",
    "enable_compile_cache", "fit", "init_state", "load_body", "load_sweep", "load_trained", "make_chunk_runner",
    "make_evaluator", "make_optimizer", "make_plan", "make_plateau", "prepare_data", "restore", "stack_states",
    "unit_schedule", "unstack_state", "validate_config",
]
