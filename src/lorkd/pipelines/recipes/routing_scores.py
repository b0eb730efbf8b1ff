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
from ...report.stats import bootstrap_interval, paired_bootstrap_difference

INFERENCE = ("each image goes to the task of its largest router logit (top-1), then through that task's expert "
             "and head; a wrong route counts as a wrong answer")


ROUTED_STUDENT = ("LoRKD student trained with a router (student.router, MoLA-Router); scored here with the true "
                  "task id, routed without one in the Routing section")


def mean_stat(values: np.ndarray) -> float:
    """The mean of per-item 0/1 values ``[n]`` (an accuracy)."""
    return float(np.mean(values))


@torch.no_grad()
def routed_predictions(model: nn.Module, router: nn.Module, dataset: MultiTaskDataset, device: torch.device,
                       batch_size: int = 256) -> dict[int, dict[str, np.ndarray]]:
    """Per task ``t`` of ``dataset`` (its items in the order of ``dataset.task_indices(t)``, as
    :func:`~lorkd.pipelines.recipes.classification.predict_probs`): ``{"routed": [n] routed task,
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


def summarize(routed: Mapping[int, np.ndarray], agnostic: Mapping[int, np.ndarray],
              references: Mapping[str, Mapping[int, np.ndarray]], names: list[str], metric: str = "acc",
              unit: str = "images", inference: str = INFERENCE) -> dict[str, Any]:
    """The ``routing`` key of ``metrics.json``, for any recipe.

    Args:
        routed: per task ``t``, ``[n]`` the routed task of each of its test items.
        agnostic: per task, ``[n]`` each item's score routed without a task id (0/1 correct; a case's Dice).
        references: per model key (``true_id``, ``mola_grad``), per task, ``[n]`` the scores of the
            same items by that model with the task id.
        names: task names; ``metric``: the score's name (``acc``, ``dice``); ``unit``: what an item is.

    Returns ``route_acc`` and per task ``route_acc``, ``task_agnostic_<metric>``, ``<key>_<metric>``
    (95% bootstrap intervals) and ``task_agnostic_minus_<key>`` (paired), the task confusion matrix
    (rows: true task, columns: routed task) and the means over tasks.
    """
    num = len(names)
    confusion = np.zeros((num, num), dtype=np.int64)
    per_task: dict[str, Any] = {}
    for t, r in routed.items():
        confusion[t] += np.bincount(r, minlength=num)
        row: dict[str, Any] = {"n": int(r.size),
                               "route_acc": bootstrap_interval(mean_stat, [(r == t).astype(np.float64)]),
                               f"task_agnostic_{metric}": bootstrap_interval(mean_stat, [agnostic[t]])}
        for key, values in references.items():
            if t in values:
                row[f"{key}_{metric}"] = bootstrap_interval(mean_stat, [values[t]])
                row[f"task_agnostic_minus_{key}"] = paired_bootstrap_difference(mean_stat, [agnostic[t]], [values[t]])
        per_task[names[t]] = row
    every = np.concatenate([(r == t).astype(np.float64) for t, r in routed.items()])
    keys = ("route_acc", *(f"{k}_{metric}" for k in ("task_agnostic", "true_id", "mola_grad")))
    return {"split": "test", "tasks": list(names), "metric": metric, "unit": unit, "inference": inference,
            "route_acc": bootstrap_interval(mean_stat, [every]), "confusion": confusion.tolist(),
            "per_task": per_task,
            "mean": {key: float(np.mean([row[key]["value"] for row in per_task.values()]))
                     for key in keys if all(key in row for row in per_task.values())}}
