"""Recomputing BatchNorm running statistics as exact averages over chosen batches.

A model trained with BatchNorm is evaluated with running statistics that an exponential moving
average built from the last training batches. When each batch holds few rows per task (per-task
norms of a mixed batch) or the training images are augmented, those statistics are noisy, and
validation accuracy swings between epochs with them. :func:`recompute_norm_statistics` replaces
them by the cumulative average over given batches (PyTorch's ``momentum=None`` mode, per task for
:class:`~lorkd.experts.layers.TaskBatchNorm`), e.g. the training images without augmentation.
:class:`NormStatistics` does it in training, before each validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..experts.layers import TaskBatchNorm
from .handlers import Handler

if TYPE_CHECKING:  # annotations only: loop imports handlers
    from .loop import TrainingLoop

NORMS = (_BatchNorm, TaskBatchNorm)


def tracked_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm-like modules of ``model`` that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, NORMS) and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def recompute_norm_statistics(model: nn.Module, batches: Iterable[Any], device: torch.device | str) -> int:
    """Set every tracked norm's running mean/variance to the average over ``batches`` of their
    batch statistics (and ``num_batches_tracked`` to their count), leaving everything else as it was.

    ``batches`` yields :class:`~lorkd.data.batching.TaskBatch` es (``images [B, C, *spatial]``,
    ``task_ids [B]``); ``model(images, task_ids)`` is called in training mode under ``no_grad``
    (no gradient, no optimiser state touched, the model's mode and momenta restored after). A per-task
    norm averages each task over the batches that hold it; a task absent from every batch keeps
    zero mean and unit variance, as a freshly reset norm. Returns the number of batches used
    (0: the model has no tracked norm, nothing is run).
    """
    norms = tracked_norms(model)
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    used = 0
    try:
        for m in norms:
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.num_batches_tracked.zero_()
            m.momentum = None  # cumulative average
        model.train()
        for batch in batches:
            batch = batch.to(device)
            model(batch.images, batch.task_ids)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return used


class NormStatistics(Handler):
    """Before each validation (``validation_started``), rank 0 recomputes the norm statistics of the
    model about to be validated (``loop.selected_model``: the weight average with ``FitConfig.ema``)
    with :func:`recompute_norm_statistics` over ``batches``, so that the statistics it is validated,
    selected (``best.pt``) and exported with are exact averages over those batches.

    Args:
        batches: :class:`~lorkd.data.batching.TaskBatch` es (``images [B, C, *spatial]``,
            ``task_ids [B]``), e.g. training images without augmentation; reused at every epoch.
    """

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def validation_started(self, loop: TrainingLoop) -> None:
        if loop.ctx.is_main:
            recompute_norm_statistics(loop.selected_model, self.batches, loop.ctx.device)
