"""Classification tasks given as in-memory arrays (the Python entry point ``lorkd.decompose``).

A :class:`Task` holds what a MedMNIST ``.npz`` file holds, as arrays: per split (``train``,
``val``, ``test``) images ``[N, H, W]`` / ``[N, H, W, C]`` (2D) or ``[N, D, H, W]`` /
``[N, D, H, W, C]`` (3D volumes) and integer labels ``[N]`` (or ``[N, 1]``). :func:`check_tasks`
turns a list of them (or of :class:`~lorkd.data.medmnist.ClassificationTask`) into checked
``ClassificationTask`` records by the checks of :func:`~lorkd.data.medmnist.load_npz_task`
(:func:`~lorkd.data.medmnist.task_from_arrays`: image dtypes and ranges, shapes, label ranges), each
error naming the task (``tasks[i] ('name')``) and the array in the ``.npz`` layout
(``'val_images'``: split and field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DataError
from .medmnist import SPLITS, ClassificationTask, task_from_arrays

__all__ = ["Task", "check_tasks"]


@dataclass
class Task:
    """One classification task in memory.

    Attributes:
        name: unique among the run's tasks (names the expert folder ``experts/<name>``).
        images: ``{"train"|"val"|"test": array}``: uint8 (0-255), uint16, bool, integers in
            [0, 255] or floats in [0, 1] / [0, 255], shaped ``[N, H, W]``, ``[N, H, W, C]``,
            ``[N, D, H, W]`` or ``[N, D, H, W, C]`` (a NumPy array or anything ``np.asarray`` reads,
            e.g. a CPU tensor).
        labels: ``{split: array}`` of ``N`` integer labels in ``[0, num_classes)``, ``[N]`` or ``[N, 1]``.
        num_classes: default: the largest label + 1.
        spatial_dims: 2 or 3; default inferred from the shape (needed for an ambiguous 4D array).
        class_names: written to the exported expert's ``card.json``.
    """

    name: str
    images: Mapping[str, Any]
    labels: Mapping[str, Any]
    num_classes: int | None = None
    spatial_dims: int | None = None
    class_names: list[str] | None = None


def check_tasks(tasks: Sequence[Task | ClassificationTask]) -> list[ClassificationTask]:
    """The checked :class:`ClassificationTask` of each task (source ``"memory"`` for a :class:`Task`).

    Raises:
        DataError: no task, a task that is neither, duplicate names, a missing or unknown split,
            an empty split, images of a dtype, range or shape that cannot be read (or differing
            between splits), images and labels of different lengths, labels that are not
            integers in ``[0, num_classes)``, or val/test classes that train lacks; the message
            starts with ``tasks[i] ('name')`` and names the split and field (``'val_labels'``).
    """
    if isinstance(tasks, (Task, ClassificationTask, str)) or not isinstance(tasks, Sequence) or not tasks:
        raise DataError(f"tasks: give a non-empty list of lorkd.data.memory.Task (or ClassificationTask), got "
                        f"{type(tasks).__name__}")
    out = [_check_task(task, f"tasks[{i}]") for i, task in enumerate(tasks)]
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"tasks: task names must be unique, {dupes} occur more than once")
    return out


def _check_task(task: Any, key: str) -> ClassificationTask:
    if isinstance(task, ClassificationTask):
        given = Task(task.name, task.images, task.labels, task.num_classes, task.spatial_dims)
        source = task.source
    elif isinstance(task, Task):
        given, source = task, "memory"
    else:
        raise DataError(f"{key}: expected a lorkd.data.memory.Task or ClassificationTask, got {type(task).__name__}")
    if not isinstance(given.name, str) or not given.name.strip() or "/" in given.name:
        raise DataError(f"{key}.name: give a non-empty name without '/', got {given.name!r}")
    key = f"{key} ({given.name!r})"
    images, labels = _splits(given.images, f"{key}.images"), _splits(given.labels, f"{key}.labels")
    arrays = {f"{split}_{field}": _array(values[split], f"{key}.{field}[{split!r}]")
              for split in SPLITS for field, values in (("images", images), ("labels", labels))}
    return task_from_arrays(arrays, given.name, source, given.num_classes, given.spatial_dims, where=key)


def _splits(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DataError(f"{key}: expected a mapping {{'train': ..., 'val': ..., 'test': ...}}, got {type(value).__name__}")
    missing, unknown = [s for s in SPLITS if s not in value], sorted(set(value) - set(SPLITS))
    if missing or unknown:
        raise DataError(f"{key}: needs exactly the splits {list(SPLITS)}; missing {missing}, unknown {unknown}")
    return value


def _array(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise DataError(f"{key}: not a numeric array (dtype object, from {type(value).__name__})")
    return arr

