"""Training one network of a stage: a task-mixing sampler, the engine's :func:`~lorkd.engine.trainer.fit`,
and the epoch with the best validation score kept."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ...data.batching import TaskBatch, TaskBatchSampler, collate_task_batch
from ...engine.checkpoint import load_checkpoint
from ...engine.distributed import DistributedContext
from ...engine.handlers import ScalarsHandler
from ...engine.norms import NormStatistics
from ...engine.scalars import open_tensorboard
from ...engine.trainer import FitConfig, fit
from ..schema import Stage

log = logging.getLogger("lorkd")


def fit_stage(model: nn.Module, objective: Any, train_set: Any, stage: Stage, folder: Path, ctx: DistributedContext, *, seed: int,
              num_workers: int, progress: bool, resume: bool, evaluate: Callable[[nn.Module], dict[str, float]],
              select_metric: str, task_names: list[str], sampler_mode: str = "proportional",
              extra: nn.Module | None = None, tensorboard: bool = False) -> nn.Module:
    """Train ``model`` on ``train_set`` with a :class:`TaskBatchSampler` under :func:`fit`; keep
    the epoch with the best ``select_metric`` of ``evaluate`` (``checkpoints/best.pt``).

    ``train_set`` must give each task a contiguous block of indices (``task_sizes``). With
    ``stage.recompute_norm_stats``, the norm statistics are recomputed before each validation
    (:class:`~lorkd.engine.norms.NormStatistics` over :func:`norm_batches`); with ``tensorboard``,
    rank 0 writes each epoch's scalars to ``folder/tensorboard/`` (a
    :class:`~lorkd.engine.handlers.ScalarsHandler`)."""
    handlers: list[Any] = []
    if stage.recompute_norm_stats:
        handlers.append(NormStatistics(norm_batches(train_set, stage.recompute_norm_stats, stage.batch_size)))
    sampler = make_sampler(train_set, stage, ctx, seed, sampler_mode)
    fit_cfg = FitConfig(epochs=stage.epochs, batch_size=stage.batch_size, optim=stage.optim, seed=seed,
                        checkpoint_every=stage.checkpoint_every, amp=stage.amp, select_metric=select_metric,
                        num_workers=num_workers, progress=progress, stage=folder.name,
                        early_stop=stage.early_stop.patience if stage.early_stop else None,
                        early_stop_min_delta=stage.early_stop.min_delta if stage.early_stop else 0.0, ema=stage.ema)
    model = model.to(ctx.device)
    if ctx.is_main:
        log.info(f"[{folder.name}] {stage.epochs} epochs x {len(sampler)} steps per epoch "
                 f"(batch {stage.batch_size} per rank x world size {ctx.world_size}; {len(train_set)} training items)")
    if tensorboard and ctx.is_main:
        handlers.append(ScalarsHandler(open_tensorboard(folder / "tensorboard")))
    fit(model, objective, train_set, sampler, fit_cfg, folder, ctx, evaluate=evaluate, extra_modules=extra,
        resume=resume and (folder / "checkpoints" / "latest.pt").is_file(), task_names=task_names, handlers=handlers)
    best = folder / "checkpoints" / "best.pt"
    if best.is_file():  # the epoch with the best validation score (its extra modules too, e.g. a router)
        state = load_checkpoint(best)
        model.load_state_dict(state["model"])
        if extra is not None and state.get("extra_modules") is not None:
            extra.load_state_dict(state["extra_modules"])
    return model


def norm_batches(train_set: Any, per_task: int, batch_size: int) -> list[TaskBatch]:
    """The first ``per_task`` items of each task of ``train_set`` (its task blocks, ``task_sizes``)
    without augmentation, in batches of ``batch_size``: what
    :class:`~lorkd.engine.norms.NormStatistics` averages over (``*.train.recompute_norm_stats``)."""
    plain = copy.copy(train_set)
    plain.augment = None  # the same items, as validation sees images
    index, start = [], 0
    for size in train_set.task_sizes:
        index += range(start, start + min(per_task, size))
        start += size
    return [collate_task_batch([plain[i] for i in index[k:k + batch_size]]) for k in range(0, len(index), batch_size)]


def make_sampler(train_set: Any, stage: Stage, ctx: DistributedContext, seed: int,
                 sampler_mode: str = "proportional") -> TaskBatchSampler:
    """The task-mixing batch sampler a stage trains with (its ``len`` is the steps per epoch)."""
    return TaskBatchSampler(train_set, stage.batch_size, mode=sampler_mode, seed=seed,
                            num_replicas=ctx.world_size, rank=ctx.rank, drop_last=ctx.is_distributed)
