"""Training a routed student (``student.router``, MoLA-Router): the router with its schedule, and the
objective that routes the student's experts with it.

What the backbone is routed with in a training step:

* the first ``student.router.teacher_forcing`` epochs: the true task id (hard ids, LoRKD's explicit
  gradient separation), while the router learns from its own losses only;
* afterwards: the router's weights ``softmax(logits / temperature)`` (the ``top_k`` largest kept;
  ``top_k: 1`` routes by the router's argmax as hard ids), so each expert trains on the images the
  router sends it, and, with soft weights, the task losses reach the router too.

Each row's loss is computed with the head of its *true* task (its labels belong to that task) and
the teacher sees the true task id, as in the unrouted student. The router's own loss (TwD on its
projection + cross-entropy on the task id, :func:`lorkd.distill.router_loss`) is added every step.
One optimiser trains student and router (the router is an ``extra_modules`` of the loop).

Segmentation (a case routed once, top-1): the router sees whole cases, not the training patches:
``views(task_ids, step)`` gives its input rows (a whole training case of each row's task, resized),
and the experts always train with the true task id (``forced_steps=None``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...distill import router_loss
from ...engine.trainer import StepLoss
from ...models.router import TaskRouter, routing_weights
from ..schema import Distill, Router
from .features import FeatureDistiller
from .objective import DistillObjective


class RouterTraining(nn.Module):
    """A :class:`~lorkd.models.router.TaskRouter` with its training settings and step count.

    The count is a buffer, so ``latest.pt`` (the loop's ``extra_modules``) keeps it and a resumed
    run switches from the true task id to the router at the same step.

    Args:
        router: the router being trained.
        settings: ``student.router``.
        forced_steps: steps routed by the true task id (``teacher_forcing`` x steps per epoch);
            ``None``: every step (segmentation).
        views: ``(task_ids [B], step) -> [B, C, *size]``, the router's input rows of a step
            (segmentation: whole cases); ``None``: the batch's images.
    """

    def __init__(self, router: TaskRouter, settings: Router, forced_steps: int | None,
                 views: Callable[[Tensor, int], Tensor] | None = None) -> None:
        super().__init__()
        self.router, self.settings, self.views = router, settings, views
        self.forced_steps = None if forced_steps is None else int(forced_steps)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def inputs(self, batch: Any) -> Tensor:
        """The router's input of this step (call before :meth:`routing`, which counts the step)."""
        if self.views is None:
            return batch.images
        return self.views(batch.task_ids.cpu(), int(self.step)).to(batch.images.device)

    def routing(self, logits: Tensor, task_ids: Tensor) -> Tensor:
        """What this training step routes the backbone with (see the module), and count the step:
        ``task_ids`` ``[B]`` while forced, then ``[B, T]`` weights, or ``[B]`` argmax ids (``top_k`` 1)."""
        forced = self.forced_steps is None or int(self.step) < self.forced_steps
        self.step += 1
        s = self.settings
        if forced:
            return task_ids
        if s.top_k == 1:
            return logits.argmax(dim=1)
        return routing_weights(logits, s.temperature, min(s.top_k, logits.shape[1]) if s.top_k else None)


class RoutedObjective(DistillObjective):
    """:class:`~lorkd.pipelines.core.objective.DistillObjective`'s per-task loss through the routed
    experts, plus the router's loss (logged as part ``router``)."""

    def __init__(self, weights: Distill, router: RouterTraining, teacher: nn.Module | None = None,
                 features: FeatureDistiller | None = None, world_size: int = 1,
                 task_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        super().__init__(weights, teacher, features, world_size, task_loss)
        self.router = router

    def __call__(self, model: nn.Module, batch: Any, global_counts: Tensor) -> StepLoss:
        routed = self.router.router(self.router.inputs(batch))
        routing = self.router.routing(routed.logits, batch.task_ids)
        loss = self.step_loss(model(batch.images, routing, batch.task_ids), batch, global_counts)
        s = self.router.settings
        own = router_loss(routed.logits, routed.projection, batch.task_ids, s.twd_weight, s.task_loss_weight,
                          s.twd_temperature)
        loss.total = loss.total + own
        loss.parts["router"] = float(own.detach())
        return loss
