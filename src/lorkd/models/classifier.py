"""A backbone with one classification head per task: teacher, student and baselines alike.

The backbone is a plain feature extractor (teacher, MTL/STL baselines) or an
:class:`~lorkd.experts.ExpertModel` around one (the LoRKD student); the class is the same.
Heads are task-owned: each task's rows go through its own head only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..experts import ExpertModel, add_experts, build_architecture
from .backbones import build_backbone


@dataclass
class TaskOutput:
    """What a multi-task network returns for a batch of ``B`` rows.

    Attributes:
        features: ``[B, F]`` pooled backbone features, rows in input order.
        logits: task id -> ``[n_t, C_t]`` logits of the rows of that task.
        rows: task id -> ``[n_t]`` row indices (into the batch) of that task, ascending.
    """

    features: Tensor
    logits: dict[int, Tensor]
    rows: dict[int, Tensor]


class MultiTaskClassifier(nn.Module):
    """``backbone`` + one ``nn.Linear`` head per task.

    Args:
        backbone_spec: architecture spec of the plain backbone (``[B, C, *sp] -> [B, F]``).
        num_classes: classes of each task, in task-id order.
        experts: ``None`` for a plain backbone, else keyword arguments of
            :func:`lorkd.add_experts` (``rank``, ``alpha``, ``norm``, ``targets``).
    """

    def __init__(self, backbone_spec: dict[str, Any], num_classes: list[int], experts: dict[str, Any] | None = None) -> None:
        super().__init__()
        backbone, dim = build_backbone(backbone_spec)
        self.backbone_spec = backbone_spec
        self.feature_dim = dim
        self.num_classes = list(num_classes)
        self.backbone = backbone if experts is None else add_experts(backbone, len(num_classes), **experts)
        self.heads = nn.ModuleList(nn.Linear(dim, c) for c in num_classes)

    @property
    def has_experts(self) -> bool:
        return isinstance(self.backbone, ExpertModel)

    def forward(self, x: Tensor, task_ids: Tensor) -> TaskOutput:
        """``x`` ``[B, C, *spatial]``, ``task_ids`` int64 ``[B]`` -> :class:`TaskOutput`."""
        features = self.backbone(x, task_ids) if self.has_experts else self.backbone(x)
        logits, rows = {}, {}
        for task in torch.unique(task_ids).tolist():
            if not 0 <= task < len(self.heads):
                raise ValueError(f"task id {task} is out of range: this model has heads for tasks 0..{len(self.heads) - 1}")
            rows[task] = torch.nonzero(task_ids == task).squeeze(1)
            logits[task] = self.heads[task](features.index_select(0, rows[task]))
        return TaskOutput(features, logits, rows)

    def export_task(self, task: int) -> tuple[nn.Sequential, dict[str, Any]]:
        """Task ``task`` as a plain ``nn.Sequential(backbone, head)`` and its architecture spec.

        With experts, the backbone is ``extract(task)``: expert merged, no lorkd inside. The
        result maps ``[B, C, *spatial]`` to ``[B, C_task]`` logits and needs no task ids.
        """
        backbone = self.backbone.extract(task) if self.has_experts else self.backbone
        head = self.heads[task]
        plain = plain_classifier(self.backbone_spec, self.feature_dim, self.num_classes[task])
        plain.load_state_dict(_sequential_state(backbone, head), strict=True)
        spec = {"factory": "lorkd.models.classifier.plain_classifier",
                "kwargs": {"backbone": self.backbone_spec, "feature_dim": self.feature_dim,
                           "num_classes": self.num_classes[task]}}
        return plain.train(self.training), spec


def plain_classifier(backbone: dict[str, Any], feature_dim: int, num_classes: int) -> nn.Sequential:
    """``nn.Sequential(backbone, nn.Linear(feature_dim, num_classes))``: an exported expert.

    Without lorkd the same model is ``nn.Sequential(OrderedDict(backbone=<factory>(**kwargs),
    head=nn.Linear(feature_dim, num_classes)))``; state dict keys ``backbone.*`` and ``head.*``.
    """
    return nn.Sequential(OrderedDict(backbone=build_architecture(backbone), head=nn.Linear(feature_dim, num_classes)))


def _sequential_state(backbone: nn.Module, head: nn.Module) -> dict[str, Tensor]:
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return state
