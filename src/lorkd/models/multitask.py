"""What every multi-task network of the recipes shares: a backbone (plain, or an
:class:`~lorkd.experts.ExpertModel` around one) plus one task-owned head per task.

:class:`MultiTaskNet` routes each task's rows through its own head and exports one task as a
plain ``nn.Sequential(OrderedDict(backbone=..., head=...))``; the classifier and the segmenter
differ only in their backbone (pooled features ``[B, F]`` or a feature map ``[B, F, *spatial]``)
and their head (``nn.Linear`` or a 1x1 ``ConvNd``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..experts import ExpertModel, add_experts, build_architecture, check_weights


@dataclass
class TaskOutput:
    """What a multi-task network returns for a batch of ``B`` rows.

    Attributes:
        features: ``[B, F]`` pooled backbone features (classifier) or ``[B, F, *spatial]``
            feature map (segmenter), rows in input order.
        logits: task id -> ``[n_t, C_t]`` (or ``[n_t, C_t, *spatial]``) logits of that task's rows.
        rows: task id -> ``[n_t]`` row indices (into the batch) of that task, ascending.
    """

    features: Tensor
    logits: dict[int, Tensor]
    rows: dict[int, Tensor]


class MultiTaskNet(nn.Module):
    """``backbone`` (optionally with experts) + ``heads[t]`` per task.

    Subclasses set ``backbone_spec``, ``feature_dim`` and ``num_classes`` and implement
    :meth:`plain_spec` (the architecture spec of one exported task).
    """

    def __init__(self, backbone: nn.Module, heads: list[nn.Module], experts: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone if experts is None else add_experts(backbone, len(heads), **experts)
        self.heads = nn.ModuleList(heads)

    @property
    def has_experts(self) -> bool:
        return isinstance(self.backbone, ExpertModel)

    @property
    def feature_root(self) -> nn.Module:
        """The module whose layer names the configs use for this network as a teacher (here: itself;
        a loaded foundation model, :class:`~lorkd.models.teacher.Foundation`: the user's module)."""
        return self

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def forward(self, x: Tensor, task_ids: Tensor, head_ids: Tensor | None = None) -> TaskOutput:
        """``x`` ``[B, C, *spatial]``, ``task_ids`` int64 ``[B]`` -> :class:`TaskOutput`.

        ``task_ids`` may instead be float mixture weights ``[B, T]`` (soft routing, MoLA-Router):
        the backbone's experts are mixed per row, and each row goes to the head of its top task
        (the argmax of its weights); ``rows`` and ``logits`` are keyed by that task.
        ``head_ids`` (int64 ``[B]``): the head of each row instead (a routed student in training:
        the experts the router chose, the head of the row's true task, whose labels it has).

        Raises:
            ValueError: a task id outside ``[0, T)``; weights the backbone refuses; ``head_ids`` not
                of shape ``[B]``.
        """
        features = self.backbone(x, task_ids) if self.has_experts else self.backbone(x)
        if task_ids.dtype.is_floating_point:
            if not self.has_experts:
                check_weights(task_ids, x.shape[0], self.num_tasks)
            task_ids = task_ids.argmax(dim=1)
        if head_ids is not None:
            if head_ids.shape != (x.shape[0],) or head_ids.dtype.is_floating_point:
                raise ValueError(f"head_ids must be an integer tensor [{x.shape[0]}], got {head_ids.dtype} "
                                 f"{list(head_ids.shape)}")
            task_ids = head_ids
        logits, rows = {}, {}
        for task in torch.unique(task_ids).tolist():
            if not 0 <= task < len(self.heads):
                raise ValueError(f"task id {task} is out of range: this model has heads for tasks 0..{len(self.heads) - 1}")
            rows[task] = torch.nonzero(task_ids == task).squeeze(1)
            logits[task] = self.heads[task](features.index_select(0, rows[task]))
        return TaskOutput(features, logits, rows)

    def plain_spec(self, task: int) -> dict[str, Any]:
        """``{"factory", "kwargs"}`` building the plain ``Sequential(backbone, head)`` of ``task``."""
        raise NotImplementedError

    def export_task(self, task: int) -> tuple[nn.Sequential, dict[str, Any]]:
        """Task ``task`` as a plain ``nn.Sequential(backbone, head)`` and its architecture spec.

        With experts, the backbone is ``extract(task)``: expert merged, no lorkd inside; the
        result needs no task ids.
        """
        backbone = self.backbone.extract(task) if self.has_experts else self.backbone
        spec = self.plain_spec(task)
        plain = build_architecture(spec)
        plain.load_state_dict(sequential_state(backbone, self.heads[task]), strict=True)
        return plain.train(self.training), spec


def plain_sequential(backbone: nn.Module, head: nn.Module) -> nn.Sequential:
    """``nn.Sequential(OrderedDict(backbone=backbone, head=head))``: the form of an exported expert."""
    return nn.Sequential(OrderedDict(backbone=backbone, head=head))


def sequential_state(backbone: nn.Module, head: nn.Module) -> dict[str, Tensor]:
    """The state dict of :func:`plain_sequential` (keys ``backbone.*`` and ``head.*``)."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return state
