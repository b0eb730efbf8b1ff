"""A backbone with one classification head per task: teacher, student and baselines alike.

The backbone is a plain feature extractor (teacher, MTL/STL baselines) or an
:class:`~lorkd.experts.ExpertModel` around one (the LoRKD student); the class is the same.
Heads are task-owned: each task's rows go through its own head only (see
:class:`~lorkd.models.multitask.MultiTaskNet`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..experts import build_architecture
from .backbones import build_backbone
from .multitask import MultiTaskNet, TaskOutput, plain_sequential, sequential_state

__all__ = ["MultiTaskClassifier", "TaskOutput", "plain_classifier"]

_sequential_state = sequential_state  # older name


class MultiTaskClassifier(MultiTaskNet):
    """``backbone`` + one ``nn.Linear`` head per task.

    Args:
        backbone_spec: architecture spec of the plain backbone (``[B, C, *sp] -> [B, F]``).
        num_classes: classes of each task, in task-id order.
        experts: ``None`` for a plain backbone, else keyword arguments of
            :func:`lorkd.add_experts` (``rank``, ``alpha``, ``norm``, ``targets``).
    """

    def __init__(self, backbone_spec: dict[str, Any], num_classes: list[int], experts: dict[str, Any] | None = None) -> None:
        backbone, dim = build_backbone(backbone_spec)
        super().__init__(backbone, [nn.Linear(dim, c) for c in num_classes], experts)
        self.backbone_spec = backbone_spec
        self.feature_dim = dim
        self.num_classes = list(num_classes)

    def plain_spec(self, task: int) -> dict[str, Any]:
        """The result maps ``[B, C, *spatial]`` to ``[B, C_task]`` logits."""
        return {"factory": "lorkd.models.classifier.plain_classifier",
                "kwargs": {"backbone": self.backbone_spec, "feature_dim": self.feature_dim,
                           "num_classes": self.num_classes[task]}}


def plain_classifier(backbone: dict[str, Any], feature_dim: int, num_classes: int) -> nn.Sequential:
    """``nn.Sequential(backbone, nn.Linear(feature_dim, num_classes))``: an exported expert.

    Without lorkd the same model is ``nn.Sequential(OrderedDict(backbone=<factory>(**kwargs),
    head=nn.Linear(feature_dim, num_classes)))``; state dict keys ``backbone.*`` and ``head.*``.
    """
    return plain_sequential(build_architecture(backbone), nn.Linear(feature_dim, num_classes))
