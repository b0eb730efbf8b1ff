"""The training engine: distributed setup, checkpoints, the training loop (:func:`fit`, a loop of events
with handlers in :mod:`.handlers`); metrics in :mod:`.metrics`."""

from . import handlers, metrics
from .checkpoint import (
    RUN_MARKER,
    RUN_OUTPUTS,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    prepare_run_dir,
    restore_rng_state,
    save_checkpoint,
)
from .distributed import DistributedContext, global_task_counts, per_task_mean
from .handlers import Handler
from .trainer import FitConfig, FitResult, OptimConfig, StepLoss, build_optimizer, build_scheduler, fit

__all__ = [
    "CheckpointManager", "DistributedContext", "FitConfig", "FitResult", "Handler", "OptimConfig", "RUN_MARKER",
    "RUN_OUTPUTS", "StepLoss", "build_optimizer", "build_scheduler", "capture_rng_state", "fit", "global_task_counts",
    "handlers", "load_checkpoint", "metrics", "per_task_mean", "prepare_run_dir", "restore_rng_state", "save_checkpoint",
]
