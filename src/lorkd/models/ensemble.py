"""Several teachers as one: logits combined per task, features from one named member.

:class:`EnsembleTeacher` holds teachers that each map ``(x, task_ids) -> TaskOutput`` (a loaded
foundation model wrapped in :class:`~lorkd.models.teacher.Foundation`, a network lorkd trained, or
another ensemble) and answers the same call: the logits of task ``t`` are ``sum_m weights[m, t] *
logits_m[t]`` (the weights of each task sum to 1: the mean, or each member's validation metric
normalised, :func:`metric_weights`), the features and the layers of feature distillation
(:attr:`feature_root`) are those of member ``features_from``. Every member sees the same input and
task ids; segmentation logits (maps of the input's size) combine the same way.

The weights are a buffer (saved with the members' weights); :func:`build_ensemble` rebuilds an
ensemble from the record a run folder keeps (``model.json``'s ``ensemble``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .multitask import MultiTaskNet, TaskOutput
from .teacher import OneTask

__all__ = ["EnsembleTeacher", "build_ensemble", "mean_weights", "metric_weights"]


def mean_weights(members: int, tasks: int) -> Tensor:
    """``[members, tasks]``, every entry ``1 / members``."""
    return torch.full((members, tasks), 1.0 / members)


def metric_weights(scores: Sequence[Sequence[float]]) -> Tensor:
    """``scores[m][t]`` (member ``m``'s validation metric on task ``t``, >= 0) -> ``[M, T]`` weights
    proportional to them, each task's column summing to 1 (a task where every member scores 0: the mean).

    Raises:
        ValueError: a negative or non-finite score, or rows of different lengths.
    """
    w = torch.tensor([[float(s) for s in row] for row in scores], dtype=torch.float64)
    if w.ndim != 2 or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"validation metrics must be a [members, tasks] table of finite values >= 0, got {scores}")
    total = w.sum(0, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-300), torch.full_like(w, 1.0 / w.shape[0]))
    return w.float()


class EnsembleTeacher(MultiTaskNet):
    """Teachers whose logits are combined per task (see the module docstring). A
    :class:`~lorkd.models.multitask.MultiTaskNet` whose ``backbone`` is the list of members (its
    ``heads`` are placeholders: each member has its own), so the recipes score it as any teacher.

    Args:
        members: two or more teachers, each ``(x, task_ids) -> TaskOutput`` over the same tasks.
        weights: ``[members, tasks]``, each column summing to 1 (default: the mean).
        features_from: the member whose features (and layers) are the ensemble's.
        labels: the members' names (default their indices), for errors and records.

    Raises:
        ValueError: fewer than two members, weights of the wrong shape or whose columns do not sum to 1,
            ``features_from`` out of range.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Tensor | None = None, features_from: int = 0,
                 labels: Sequence[str] | None = None) -> None:
        if len(members) < 2:
            raise ValueError(f"an ensemble needs two or more members, got {len(members)}")
        tasks = _num_tasks(members[0])
        super().__init__(nn.ModuleList(members), [nn.Identity() for _ in range(tasks)])
        weights = mean_weights(len(members), tasks) if weights is None else weights.detach().float().clone()
        if weights.ndim != 2 or weights.shape[0] != len(members):
            raise ValueError(f"weights must be [members={len(members)}, tasks], got {list(weights.shape)}")
        if not torch.allclose(weights.sum(0), torch.ones(weights.shape[1]), atol=1e-5):
            raise ValueError(f"the weights of each task must sum to 1, got sums {weights.sum(0).tolist()}")
        if not 0 <= features_from < len(members):
            raise ValueError(f"features_from {features_from} is out of range (members 0..{len(members) - 1})")
        self.register_buffer("weights", weights)
        self.features_from = features_from
        self.labels = list(labels) if labels is not None else [str(i) for i in range(len(members))]
        self.feature_dim = getattr(self.feature_member, "feature_dim", None)

    @property
    def members(self) -> nn.ModuleList:
        return self.backbone

    @property
    def feature_member(self) -> nn.Module:
        return self.members[self.features_from]

    @property
    def feature_root(self) -> nn.Module:
        """The module whose layer names feature distillation uses: that of member ``features_from``."""
        member = self.feature_member
        return getattr(member, "feature_root", member)

    @property
    def num_classes(self) -> list[int] | None:
        return getattr(self.members[0], "num_classes", None)

    def forward(self, x: Tensor, task_ids: Tensor) -> TaskOutput:
        """``x`` ``[B, C, *spatial]``, ``task_ids`` int64 ``[B]`` -> :class:`TaskOutput`: each task's
        logits the weighted sum of the members' (in member order), features of ``features_from``."""
        outs = [member(x, task_ids) for member in self.members]
        logits = {}
        for task in outs[0].logits:
            total = self.weights[0, task].to(outs[0].logits[task].dtype) * outs[0].logits[task]
            for m in range(1, len(outs)):
                total = total + self.weights[m, task].to(outs[m].logits[task].dtype) * outs[m].logits[task]
            logits[task] = total
        return TaskOutput(outs[self.features_from].features, logits, outs[0].rows)

    def export_task(self, task: int) -> tuple[nn.Module, None]:
        """Task ``task`` as a module ``x -> logits`` (every member runs: for FLOPs and latency); no spec."""
        return OneTask(self, task), None


def _num_tasks(member: nn.Module) -> int:
    classes = getattr(member, "num_classes", None)
    if classes is not None:
        return len(classes)
    heads = getattr(member, "heads", None)
    if heads is None:
        raise ValueError(f"cannot tell the number of tasks of a {type(member).__name__} (no num_classes, no heads)")
    return len(heads)


def build_ensemble(record: Mapping[str, Any], build_member: Callable[[dict[str, Any]], nn.Module]) -> EnsembleTeacher:
    """An ensemble from its record (``{"members": [member meta, ...], "features_from", "labels"}``),
    each member rebuilt by ``build_member(meta)``; the weights are placeholders until the saved state
    dict is loaded."""
    members = [build_member(meta) for meta in record["members"]]
    return EnsembleTeacher(members, None, int(record.get("features_from", 0)), record.get("labels"))
