"""A backbone with one classification head per task: teacher, student and baselines alike; and
:class:`Classifier`, a backbone with one head (``lorkd transfer``'s downstream models).

The backbone is a plain feature extractor (teacher, MTL/STL baselines) or an
:class:`~lorkd.experts.ExpertModel` around one (the LoRKD student); the class is the same.
Heads are task-owned: each task's rows go through its own head only (see
:class:`~lorkd.models.multitask.MultiTaskNet`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..experts import ExpertModel, build_architecture
from .backbones import build_backbone
from .multitask import MultiTaskNet, TaskOutput, plain_sequential, sequential_state

__all__ = ["Classifier", "MultiTaskClassifier", "TaskOutput", "plain_classifier", "plain_spec"]

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


class Classifier(nn.Module):
    """``head(backbone(x))``: ``[B, C, *spatial] -> [B, K]`` (segmentation: ``[B, K, *spatial]``, the
    head a 1x1 convolution).

    With ``frozen``, the backbone stays in eval mode (BatchNorm statistics fixed) whatever
    ``train()`` is called with; which of its parameters train is set by the caller. An
    :class:`~lorkd.experts.ExpertModel` backbone (``foundation_lora``) is called with task 0.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, frozen: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.frozen = backbone, head, frozen

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.backbone, ExpertModel):
            return self.head(self.backbone(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)))
        return self.head(self.backbone(x))

    def export(self) -> nn.Sequential:
        """A plain ``nn.Sequential(backbone, head)`` (adapters merged); same logits in eval mode."""
        backbone = self.backbone.extract(0) if isinstance(self.backbone, ExpertModel) else copy.deepcopy(self.backbone)
        return plain_sequential(backbone, copy.deepcopy(self.head)).train(self.training)


def plain_spec(backbone_spec: dict[str, Any] | None, feature_dim: int, num_classes: int,
               dense_dims: int | None = None) -> dict[str, Any] | None:
    """The architecture spec of ``plain_classifier`` (or ``plain_segmenter`` with ``dense_dims``):
    what ``load_expert`` rebuilds; ``None`` for a backbone without a spec (a ``foundation.source``
    model: its saved weights load with ``load_expert(folder, model=...)``)."""
    if backbone_spec is None:
        return None
    kwargs = {"backbone": backbone_spec, "feature_dim": feature_dim, "num_classes": num_classes}
    if dense_dims is None:
        return {"factory": "lorkd.models.classifier.plain_classifier", "kwargs": kwargs}
    return {"factory": "lorkd.models.segmenter.plain_segmenter", "kwargs": {**kwargs, "spatial_dims": dense_dims}}
