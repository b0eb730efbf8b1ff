"""Scoring code the recipes share: class probabilities of a classifier on a task's items
(:func:`predict_probs`, classification and ``lorkd transfer``), and the ``routing`` key of
``metrics.json`` of a routed student (:func:`summarize`, classification and segmentation).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ...data.multitask import MultiTaskDataset, collate_task_batch
from ...models.multitask import MultiTaskNet
from ...report.stats import bootstrap_interval, paired_bootstrap_difference
from .objective import TaskRemap

INFERENCE = ("each image goes to the task of its largest router logit (top-1), then through that task's expert "
             "and head; a wrong route counts as a wrong answer")


ROUTED_STUDENT = ("LoRKD student trained with a router (student.router, MoLA-Router); scored here with the true "
                  "task id, routed without one in the Routing section")


def mean_stat(values: np.ndarray) -> float:
    """The mean of per-item 0/1 values ``[n]`` (an accuracy)."""
    return float(np.mean(values))


def predict_probs(model: nn.Module, dataset: MultiTaskDataset, device: torch.device, tasks: list[int] | None = None,
                  batch_size: int = 256) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Class probabilities and labels per task: ``{task: (probs [n, C_t], labels [n])}``.

    ``model`` is a multi-task network (:class:`MultiTaskClassifier`, a loaded teacher; any task)
    or a plain network of one task (then
    ``tasks`` must hold that single task). The model is put in eval mode and restored after.
    """
    was_training = model.training
    model.eval()
    tasks = list(range(len(dataset.tasks))) if tasks is None else tasks
    result = {}
    for task in tasks:
        idx = list(dataset.task_indices(task))
        probs = []
        for start in range(0, len(idx), batch_size):
            batch = collate_task_batch([dataset[i] for i in idx[start:start + batch_size]]).to(device)
            if isinstance(model, (MultiTaskNet, TaskRemap)) or hasattr(model, "module"):
                logits = model(batch.images, batch.task_ids).logits[task]
            else:
                logits = model(batch.images)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels = dataset.labels[idx].numpy()
        result[task] = (np.concatenate(probs), labels)
    model.train(was_training)
    return result


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
