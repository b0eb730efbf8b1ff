"""The per-task distillation objective every decomposition stage trains with, and the teacher
seen through a subset of its tasks (what a single-task baseline distils from)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...distill import soft_target_kd
from ...engine.trainer import StepLoss
from ..schema import Distill
from .features import FeatureDistiller, feature_terms


def global_mean(local_mean: Tensor, local_count: int, global_count: int, world_size: int) -> Tensor:
    """Rescale a task's mean over this rank's rows so that, after DDP averages gradients over
    ``world_size`` ranks, it equals the mean over the task's rows of the *global* batch."""
    return local_mean * (local_count * world_size / global_count)


class DistillObjective:
    """Per-task loss ``ce_w * CE + kd_w * T^2 KL(teacher || student) + sum_i w_i * feature term i``.

    Each term is a mean over the task's rows of the global batch (a feature term is computed on
    the task's rows of this rank and rescaled like the others; for ``cka`` that is the CKA of
    this rank's rows, weighted by their share); the total is the mean over the tasks present in
    the global batch, so every task weighs the same whatever its share.

    Args:
        weights: the :class:`~lorkd.pipelines.schema.Distill` weights and temperature.
        teacher: the frozen teacher (kept in eval mode, run under ``no_grad``), or ``None``.
        features: the feature terms (:class:`~lorkd.pipelines.core.features.FeatureDistiller`), needed
            when ``weights`` has any; ``None`` otherwise.
        world_size: number of DDP ranks.
        task_loss: ``(logits, labels) -> scalar``; cross-entropy by default.
    """

    def __init__(self, weights: Distill, teacher: nn.Module | None = None, features: FeatureDistiller | None = None,
                 world_size: int = 1, task_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        self.weights = weights
        self.teacher = teacher
        self.features = features
        self.world_size = world_size
        self.task_loss = task_loss or nn.functional.cross_entropy
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if weights.uses_teacher and teacher is None:
            raise ValueError("distillation weights are > 0 but no teacher was given")
        if feature_terms(weights) and features is None:
            raise ValueError("feature distillation weights are > 0 but no FeatureDistiller was given")
        self.terms = features.terms if features is not None else []

    def __call__(self, model: nn.Module, batch: Any, global_counts: Tensor) -> StepLoss:
        return self.step_loss(model(batch.images, batch.task_ids), batch, global_counts)

    def step_loss(self, out: Any, batch: Any, global_counts: Tensor) -> StepLoss:
        """The loss of the student's output ``out`` (a :class:`~lorkd.models.multitask.TaskOutput`
        whose rows are keyed by the task whose labels they have) on ``batch``."""
        w = self.weights
        teacher_out, feats = None, {}
        if self.teacher is not None and w.uses_teacher:
            with torch.no_grad():
                self.teacher.eval()
                teacher_out = self.teacher(batch.images, batch.task_ids)
            if self.features is not None:
                feats = self.features.collect(out, teacher_out)
        present = int((global_counts > 0).sum())
        total = out.features.new_zeros(())
        used = ["ce"] * (w.ce_weight > 0) + ["kd"] * (w.kd_weight > 0) + [t.name for t in self.terms]
        per_task, parts = {}, dict.fromkeys(used, 0.0)
        for task, logits in out.logits.items():
            rows = out.rows[task]
            scale = lambda value: global_mean(value, len(rows), int(global_counts[task]), self.world_size)  # noqa: E731
            loss = out.features.new_zeros(())
            terms = {}
            if w.ce_weight > 0:
                terms["ce"] = self.task_loss(logits, batch.labels.index_select(0, rows))
                loss = loss + w.ce_weight * scale(terms["ce"])
            if teacher_out is not None and w.kd_weight > 0:
                terms["kd"] = soft_target_kd(logits, teacher_out.logits[task], w.temperature)
                loss = loss + w.kd_weight * scale(terms["kd"])
            for term in self.terms:
                student_f, teacher_f = feats[term.name]
                terms[term.name] = self.features.loss(term, student_f.index_select(0, rows),
                                                      teacher_f.index_select(0, rows))
                loss = loss + term.weight * scale(terms[term.name])
            total = total + loss / present
            per_task[task] = float(loss.detach())
            for name, value in terms.items():
                parts[name] += float(value.detach()) / len(out.logits)
        return StepLoss(total=total, per_task=per_task, parts=parts)


class TaskRemap(nn.Module):
    """The teacher seen through a subset of its tasks (local id ``i`` -> teacher task ``tasks[i]``)."""

    def __init__(self, teacher: nn.Module, tasks: list[int]) -> None:
        super().__init__()
        self.teacher = teacher
        self.map = torch.tensor(tasks)

    @property
    def feature_root(self) -> nn.Module:
        """The wrapped teacher's :attr:`feature_root` (teacher layer names are relative to it)."""
        return getattr(self.teacher, "feature_root", self.teacher)

    @property
    def num_classes(self) -> list[int]:
        """Classes of each local task (the wrapped teacher's ``num_classes`` of its tasks)."""
        return [self.teacher.num_classes[int(t)] for t in self.map]

    def export_task(self, task: int) -> tuple[nn.Module, Any]:
        """Local task ``task`` as the wrapped teacher exports it (``export_task`` of the teacher's task)."""
        return self.teacher.export_task(int(self.map[task]))

    def forward(self, x, task_ids):
        out = self.teacher(x, self.map.to(task_ids.device)[task_ids])
        inverse = {int(self.map[i]): i for i in range(len(self.map))}
        out.logits = {inverse[t]: v for t, v in out.logits.items()}
        out.rows = {inverse[t]: v for t, v in out.rows.items()}
        return out
