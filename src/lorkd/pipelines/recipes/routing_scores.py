"""Scoring a routed classification student (``student.router``): each image routed by the router,
then classified by the routed task's expert and head; a wrong route is a wrong answer.

The ``routing`` key of ``metrics.json`` (:func:`routing_summary`) holds, on test: the task-routing
accuracy (overall and per task), the task confusion matrix (rows: true task, columns: routed task),
and per task the task-agnostic accuracy beside the accuracy of the same student given the true task
id (and of the ``mola_grad`` baseline when it ran), each with a 95% bootstrap interval, and the
paired difference task-agnostic - true id (and - mola_grad) with its interval
(:mod:`lorkd.report.stats`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ...data.multitask import MultiTaskDataset, collate_task_batch
from ..core.scoring import summarize

@torch.no_grad()
def routed_predictions(model: nn.Module, router: nn.Module, dataset: MultiTaskDataset, device: torch.device,
                       batch_size: int = 256) -> dict[int, dict[str, np.ndarray]]:
    """Per task ``t`` of ``dataset`` (its items in the order of ``dataset.task_indices(t)``, as
    :func:`~lorkd.pipelines.core.scoring.predict_probs`): ``{"routed": [n] routed task,
    "pred": [n] class index in the routed task's classes, "correct": [n] bool (routed to ``t`` and
    the right class)}``. ``model`` is a multi-task student, ``router`` maps ``x`` to an object with
    ``logits [B, T]`` (a :class:`~lorkd.models.router.TaskRouter`); both are put in eval mode and
    restored after."""
    modes = model.training, router.training
    model.eval()
    router.eval()
    result = {}
    for task in range(len(dataset.tasks)):
        idx = list(dataset.task_indices(task))
        routed, pred = [], []
        for start in range(0, len(idx), batch_size):
            batch = collate_task_batch([dataset[i] for i in idx[start:start + batch_size]]).to(device)
            tasks = router(batch.images).logits.argmax(dim=1)
            out = model(batch.images, tasks)
            classes = torch.empty_like(tasks)
            for t, rows in out.rows.items():
                classes[rows] = out.logits[t].argmax(dim=1)
            routed.append(tasks.cpu().numpy())
            pred.append(classes.cpu().numpy())
        r, p = np.concatenate(routed), np.concatenate(pred)
        labels = dataset.labels[idx].numpy()
        result[task] = {"routed": r, "pred": p, "correct": (r == task) & (p == labels)}
    model.train(modes[0])
    router.train(modes[1])
    return result


def routed_val_metrics(routed: Mapping[int, Mapping[str, np.ndarray]], names: list[str]) -> dict[str, float]:
    """Validation metrics of :func:`routed_predictions`: ``acc`` (the mean over tasks of the
    task-agnostic accuracy, what selects the epoch), ``route_acc`` (mean over tasks) and
    ``acc_<task>`` per task."""
    out = {"acc": float(np.mean([r["correct"].mean() for r in routed.values()])),
           "route_acc": float(np.mean([(r["routed"] == t).mean() for t, r in routed.items()]))}
    out.update({f"acc_{names[t]}": float(r["correct"].mean()) for t, r in routed.items()})
    return out


def routing_summary(routed: Mapping[int, Mapping[str, np.ndarray]], names: list[str],
                    outputs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]) -> dict[str, Any]:
    """The ``routing`` key of ``metrics.json`` (see the module) from the test
    :func:`routed_predictions` and the evaluate stage's per-item test ``outputs``
    (``outputs[task]["student"]``, ``outputs[task]["mola_grad"]``: ``probs [n, C]``, ``labels [n]``)."""
    references: dict[str, dict[int, np.ndarray]] = {}
    for t in routed:
        for model, key in (("student", "true_id"), ("mola_grad", "mola_grad")):
            kept = outputs.get(names[t], {}).get(model)
            if kept is not None:
                references.setdefault(key, {})[t] = (kept["probs"].argmax(1) == kept["labels"]).astype(np.float64)
    return summarize({t: r["routed"] for t, r in routed.items()},
                     {t: r["correct"].astype(np.float64) for t, r in routed.items()}, references, names)
