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

from ..experts import ExpertModel, ExpertSummary, add_experts, build_architecture, check_weights


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
    :meth:`plain_spec` (the architecture spec of one exported task). ``task_names`` (``None``, or one
    name per head; a run sets its tasks' names on the networks it loads) names the adapters
    :func:`lorkd.save_adapters` writes of it and its :meth:`summary`.
    """

    def __init__(self, backbone: nn.Module, heads: list[nn.Module], experts: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone if experts is None else add_experts(backbone, len(heads), **experts)
        self.heads = nn.ModuleList(heads)
        self.task_names: list[str] | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "MultiTaskNet":
        """A subclass built as ``cls(backbone_spec, num_classes, experts)`` from what a run's ``model.json``
        records (``backbone``, ``num_classes``, optional ``experts``): :class:`~lorkd.models.classifier.MultiTaskClassifier`,
        :class:`~lorkd.models.segmenter.MultiTaskSegmenter`."""
        return cls(meta["backbone"], meta["num_classes"], meta.get("experts"))

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

    def forward(self, x: Tensor, task_ids: Tensor | int, head_ids: Tensor | None = None) -> TaskOutput:
        """``x`` ``[B, C, *spatial]``, ``task_ids`` int64 ``[B]`` (or one ``int`` for the whole batch,
        as an :func:`~lorkd.add_experts` student takes) -> :class:`TaskOutput`.

        ``task_ids`` may instead be float mixture weights ``[B, T]`` (soft routing, MoLA-Router):
        the backbone's experts are mixed per row, and each row goes to the head of its top task
        (the argmax of its weights); ``rows`` and ``logits`` are keyed by that task.
        ``head_ids`` (int64 ``[B]``): the head of each row instead (a routed student in training:
        the experts the router chose, the head of the row's true task, whose labels it has).

        Raises:
            ValueError: a task id outside ``[0, T)`` (or neither an int nor a tensor); weights the
                backbone refuses; ``head_ids`` not of shape ``[B]``.
        """
        if not isinstance(task_ids, Tensor):
            task_ids = self._batch_ids(task_ids, x.shape[0], x.device)
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

    def _batch_ids(self, task: Any, batch: int, device: torch.device) -> Tensor:
        """One task id for the whole batch as int64 ``[batch]``. Raises ValueError naming it."""
        if isinstance(task, bool) or not isinstance(task, int):
            raise ValueError(f"task_ids must be an int or an integer tensor of shape [{batch}], got {type(task).__name__}")
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task id {task} is out of range: this model has heads for tasks 0..{self.num_tasks - 1}")
        return torch.full((batch,), task, dtype=torch.long, device=device)

    def summary(self) -> ExpertSummary:
        """The backbone's experts (:meth:`~lorkd.ExpertModel.summary`: layers, ranks, parameters per
        task, shared) with, in ``extra``, the task names, the heads' classes and their parameters.

        Raises:
            ValueError: a network without experts (a teacher or a baseline)."""
        if not self.has_experts:
            raise ValueError(f"this {type(self).__name__} has no experts (a teacher or baseline network): nothing to summarise")
        out = self.backbone.summary()
        names = self.task_names or [f"task_{t}" for t in range(self.num_tasks)]
        classes = getattr(self, "num_classes", None) or ["?"] * self.num_tasks
        out.extra["tasks"] = ", ".join(f"{n} ({c} classes)" for n, c in zip(names, classes))
        out.extra["head parameters"] = f"{sum(p.numel() for p in self.heads.parameters()):,}"
        return out

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
