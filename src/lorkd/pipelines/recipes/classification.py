"""The classification recipe (2D images and 3D volumes, one label per item): its data, networks,
scoring and export, on the protocol of :class:`~lorkd.pipelines.core.recipe.DecompositionRecipe`.
The stages (teacher -> decompose -> baselines -> export -> evaluate) are :mod:`lorkd.pipelines.stages`.

Each stage reads what earlier stages wrote under the run folder and writes its own
sub-folder, so stages can run one at a time (``lorkd pretrain``, ``decompose``, ...) or all
together (``lorkd run``). A finished stage is reused, an interrupted one resumes from its
``checkpoints/latest.pt`` when ``resume`` is set. Model selection uses the validation split
only; the test split is read for the final metrics alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.medmnist import ClassificationTask, cap_train, load_npz_task
from ...data.multitask import MultiTaskDataset
from ...data.paths import locate
from ...data.synthetic import make_synthetic_tasks
from ...engine import metrics as M
from ...engine.distributed import DistributedContext
from ...errors import ConfigError, DataError
from ...experts import load_expert
from ...models.backbones import backbone_spec
from ...models.classifier import MultiTaskClassifier
from ...report.stats import majority_rate
from ..core.export_formats import class_names
from ..core.recipe import DecompositionRecipe
from ..core.scoring import ROUTED_STUDENT, predict_probs
from . import routing_scores as R
from .selection import SELECTION, select_training, selection_summary
from ..schema import ClassificationConfig, Net

log = logging.getLogger("lorkd")


# ---------------------------------------------------------------------------------------- data
def load_image_tasks(cfg: ClassificationConfig) -> list[ClassificationTask]:
    """The tasks of the config: its ``.npz`` files, or the embedded synthetic set, each capped to
    ``data.max_train`` training images (:func:`cap_tasks`).

    A relative path that does not exist is looked up under the shared data folder.

    Raises:
        DataError: a file is missing (the message lists the places searched) or fails the checks
            of :func:`~lorkd.data.medmnist.load_npz_task`; the message starts with the config key
            ``data.tasks[i]`` and names the file.
    """
    d = cfg.data
    if d.synthetic is not None:
        s = d.synthetic
        tasks = make_synthetic_tasks(s.num_tasks, s.size, s.n_train, s.n_val, s.n_test, s.seed, s.family)
        return cap_tasks(cfg, tasks)
    tasks = []
    for i, spec in enumerate(cfg.data.tasks):
        key = f"data.tasks[{i}]"
        found = locate(spec.path, f"{key}.path")
        try:
            tasks.append(load_npz_task(found, name=spec.name, num_classes=spec.num_classes,
                                       spatial_dims=spec.spatial_dims))
        except DataError as err:
            raise DataError(f"{key} ({spec.name}): {err}") from err
    check_spatial_dims(tasks)
    return cap_tasks(cfg, tasks)


def cap_tasks(cfg: ClassificationConfig, tasks: list[ClassificationTask]) -> list[ClassificationTask]:
    """``tasks`` capped to ``data.max_train`` training images each: the class-stratified random
    subset of :func:`~lorkd.data.medmnist.cap_train` (seed ``data.cap_seed``: the same for every
    model and seed), or, with ``data.select.method`` ``diverse``/``kcenter``, uncut: the recipe
    cuts them on the foundation's features once it is loaded (:mod:`.selection`)."""
    d = cfg.data
    if d.select.method != "random":
        return list(tasks)
    return [cap_train(t, d.max_train, d.cap_seed) for t in tasks]


def student_subset(task: ClassificationTask, n: int | None, seed: int = 0) -> ClassificationTask:
    """``task`` with its training split cut to ``n`` images (``data.student_n_train``): the
    class-stratified subset of :func:`~lorkd.data.medmnist.cap_train` drawn with ``seed``
    (``data.cap_seed``), the same for the student and every baseline.

    Raises:
        DataError: ``n`` exceeds the training split (names the key and the task).
    """
    if n is not None and n > task.num_samples("train"):
        raise DataError(f"data.student_n_train: {n} is more than the {task.num_samples('train')} training images "
                        f"of {task.name}")
    return cap_train(task, n, seed)


def check_spatial_dims(tasks: list[ClassificationTask], key: str = "data.tasks") -> int:
    """The one ``spatial_dims`` (2 or 3) of ``tasks``.

    Raises:
        ConfigError: the tasks mix 2D images and 3D volumes (names each task's kind and file).
    """
    dims = {t.spatial_dims for t in tasks}
    if len(dims) > 1:
        kinds = ", ".join(f"{t.name} ({t.spatial_dims}D, {t.source})" for t in tasks)
        raise ConfigError(f"{key}: the tasks mix 2D images and 3D volumes ({kinds}); one run decomposes one kind, "
                          "split them into two runs (or set spatial_dims per task if a shape was misread)")
    return dims.pop()


def make_dataset(cfg: ClassificationConfig, tasks: list[ClassificationTask], split: str, augment: bool = False,
                 channels: int | None = None) -> MultiTaskDataset:
    """One split of ``tasks``; ``channels`` (default ``data.channels``, else the most of any task)."""
    d = cfg.data
    return MultiTaskDataset(tasks, split, size=d.size, channels=channels or d.channels, augment=augment and d.augment,
                            mean=d.mean, std=d.std, seed=cfg.seed)


def image_data_summary(tasks: list[ClassificationTask], teacher_n_train: list[int] | None = None) -> list[dict[str, Any]]:
    """Per task: name, source, classes, channels, sizes and ``n_<split>`` (with ``teacher_n_train``:
    also ``n_train_teacher``, when a run's teacher trains on more images than its students)."""
    rows = [{"name": t.name, "source": str(t.source), "num_classes": t.num_classes, "channels": t.channels,
             "spatial_dims": t.spatial_dims, "image_size": list(t.image_size),
             **{f"n_{s}": t.num_samples(s) for s in ("train", "val", "test")}} for t in tasks]
    for row, n in zip(rows, teacher_n_train or []):
        row["n_train_teacher"] = n
    return rows


# ---------------------------------------------------------------------------------------- recipe
class ClassificationRecipe(DecompositionRecipe):
    """One classification run: config, tasks, datasets, device, output folder (the data is read
    and checked on construction)."""

    kind = "classification"
    select_metric = "acc"
    val_keys = ("acc", "auc")
    size_key = "data.size"
    model_descriptions = {
        "teacher": "foundation model trained on all tasks (shared backbone, one head per task)",
        "student": "LoRKD student: small backbone + one low-rank expert per task, routed by task id",
        "expert": "the exported plain expert of the task (student with its expert merged, + its head)",
        "stl": "student network trained on the task alone",
        "stl_kd": "student network trained on the task alone, with the teacher's distillation",
        "mtl": "student network, shared backbone, one head per task, no experts",
        "mtl_kd": "MTL with the teacher's distillation",
        "student_nokd": "LoRKD student without distillation (kd_weight = feat_weight = 0, no feature pairs)",
        "mola_grad": "MoLA-Grad: the routed student's network and losses, experts picked by the task id, no router",
    }

    def __init__(self, cfg: ClassificationConfig, out: Path, ctx: DistributedContext, resume: bool = False,
                 progress: bool = True) -> None:
        super().__init__(cfg, out, ctx, resume, progress)
        pool = self.load_tasks()
        self.set_data(pool)
        if cfg.data.select.method != "random":  # needs the datasets above to load the foundation
            self.set_data(select_training(self, pool))

    def set_data(self, pool: list[ClassificationTask]) -> None:
        """Tasks, names, datasets, channels and classes from ``pool`` (the teacher's training
        images; the students' are ``data.student_n_train`` of them)."""
        cfg = self.cfg
        self.tasks = [student_subset(t, cfg.data.student_n_train, cfg.data.cap_seed) for t in pool]
        self.names = [t.name for t in self.tasks]
        self.train_set = make_dataset(cfg, self.tasks, "train", augment=True)
        # a teacher trained by the run sees every training image; the students and baselines their subset
        same = all(a is b for a, b in zip(pool, self.tasks))
        self.teacher_train_set = self.train_set if same else make_dataset(cfg, pool, "train", augment=True)
        self.val_set = make_dataset(cfg, self.tasks, "val")
        self.test_set = make_dataset(cfg, self.tasks, "test")
        self.channels = self.train_set.channels
        self.spatial_dims = self.train_set.spatial_dims
        self.num_classes = [t.num_classes for t in self.tasks]

    # ---- data
    def load_tasks(self) -> list[ClassificationTask]:
        """The run's tasks before ``data.student_n_train`` (:func:`load_image_tasks`; the in-memory
        recipe of :mod:`.memory` returns the tasks it was given)."""
        return load_image_tasks(self.cfg)

    def train_data(self, tasks: list[int] | None = None) -> MultiTaskDataset:
        return self.dataset("train", tasks)

    def teacher_train_data(self) -> MultiTaskDataset:
        return self.teacher_train_set

    def dataset(self, split: str, tasks: list[int] | None = None) -> MultiTaskDataset:
        """The ``split`` of all tasks, or of ``tasks`` only (then task ids index that list)."""
        if tasks is None:
            return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        # a subset keeps the run's channel count: every network of the run takes the same input
        return make_dataset(self.cfg, [self.tasks[t] for t in tasks], split, augment=split == "train",
                            channels=self.channels)

    def task_counts(self, t: int) -> dict[str, int]:
        return {s: self.tasks[t].num_samples(s) for s in ("train", "val", "test")}

    # ---- networks
    def spec(self, net: Net) -> dict[str, Any]:
        return backbone_spec(net.arch, self.spatial_dims, self.channels, net.widen, net.conv1_stride, net.kwargs)

    def network(self, net: Net, num_classes: list[int], experts: dict[str, Any] | None = None) -> MultiTaskClassifier:
        torch.manual_seed(self.cfg.seed)
        return MultiTaskClassifier(self.spec(net), num_classes, experts)

    @staticmethod
    def build(meta: dict[str, Any]) -> MultiTaskClassifier:
        return MultiTaskClassifier.from_meta(meta)

    def meta(self, model: MultiTaskClassifier, kind: str, tasks: list[int] | None = None, **extra: Any) -> dict[str, Any]:
        tasks = tasks if tasks is not None else list(range(len(self.tasks)))
        return {"kind": kind, "backbone": model.backbone_spec, "num_classes": model.num_classes,
                "tasks": [self.names[t] for t in tasks], "channels": self.channels, "size": self.cfg.data.size,
                "spatial_dims": self.spatial_dims, "mean": self.cfg.data.mean, "std": self.cfg.data.std, **extra}

    def larger_input(self, spatial: tuple[int, ...], factor: int) -> tuple[tuple[int, ...], Any]:
        bigger = tuple(s * factor for s in spatial)
        return bigger, bigger[0]

    # ---- scoring
    def score(self, model: nn.Module, data: MultiTaskDataset, tasks: list[int] | None = None,
              keep: dict[int, dict[str, np.ndarray]] | None = None, final: bool = False) -> dict[int, dict[str, float]]:
        """Accuracy and AUC per task (:func:`score_images`)."""
        return score_images(model, data, self.ctx.device, tasks, keep=keep)

    def routed_val_metrics(self, model: nn.Module, router: nn.Module) -> dict[str, float]:
        """Task-agnostic validation accuracy (``acc``, selects the epoch), routing accuracy and
        ``acc_<task>`` (:mod:`.routing_scores`)."""
        return R.routed_val_metrics(R.routed_predictions(model, router, self.val_set, self.ctx.device), self.names)

    def routing_summary(self, model: nn.Module, router: nn.Module,
                        outputs: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
        return R.routing_summary(R.routed_predictions(model, router, self.test_set, self.ctx.device), self.names,
                                 outputs)

    # ---- export and evaluation
    def expert_card(self, t: int) -> dict[str, Any]:
        d = self.cfg.data
        card = {"task": self.names[t], "task_id": t, "classes": self.num_classes[t], "input_channels": self.channels,
                "input_size": d.size or list(self.tasks[t].image_size), "spatial_dims": self.spatial_dims,
                "normalisation": {"mean": d.mean, "std": d.std, "scale": "x / 255"},
                "rebuild_without_lorkd": "nn.Sequential(OrderedDict(backbone=<architecture.kwargs.backbone.factory>"
                                         "(**kwargs), head=nn.Linear(feature_dim, num_classes)))"}
        given = d.tasks[t].class_names if d.tasks else None
        names = class_names(self.tasks[t].source, self.num_classes[t], given, f"data.tasks[{t}].class_names")
        if names is not None:
            card["class_names"] = names
        return card

    def export_input_shape(self, t: int) -> tuple[int, ...]:
        return tuple(self.dataset("test", [t])[0][0].shape)

    def summary(self, teacher: nn.Module, student: nn.Module, results: dict[str, Any]) -> dict[str, Any]:
        """Accuracy/AUC tables, sizes, FLOPs and latency per image (``evaluate.latency_batch`` images
        per call), the data and the majority-class rates."""
        example = self.test_set[0][0][None]
        teacher_plain = teacher.export_task(0)[0].cpu()
        expert_plain = load_expert(self.out / "experts" / self.names[0]).cpu()
        ev = self.cfg.evaluate
        batch = example.repeat(ev.latency_batch, *([1] * (example.ndim - 1)))
        return {
            "task_kind": "classification", "metric_keys": ["acc", "auc"], "primary_metric": "acc", "split": "test",
            "tasks": results["test"], "val": results["val"],
            "params": {"teacher": M.count_parameters(teacher),
                       "teacher_backbone_and_one_head": M.count_parameters(teacher_plain),
                       "student": M.count_parameters(student), "expert": M.count_parameters(expert_plain)},
            "flops": {"teacher": M.count_flops(teacher_plain, example), "expert": M.count_flops(expert_plain, example)},
            "latency_ms": {"teacher": M.cpu_latency_ms(teacher_plain, batch, ev.latency_repeats) / ev.latency_batch,
                           "expert": M.cpu_latency_ms(expert_plain, batch, ev.latency_repeats) / ev.latency_batch},
            "latency_batch": ev.latency_batch,
            "data": image_data_summary(self.tasks, self.teacher_train_set.task_sizes
                                 if self.teacher_train_set is not self.train_set else None),
            "models": {**self.model_descriptions, **({"student": ROUTED_STUDENT} if self.cfg.student.router else {})},
            **({"selection": selection_summary(self.out / SELECTION)} if self.cfg.data.select.method != "random"
               else {}),
            "majority": {t.name: majority_rate(t.labels["train"], t.num_classes,
                                               {s: t.labels[s] for s in ("val", "test") if s in t.labels})
                         for t in self.tasks},
        }


@torch.no_grad()
def score_images(model: nn.Module, dataset: MultiTaskDataset, device: torch.device,
                     tasks: list[int] | None = None, keep: dict[int, dict[str, np.ndarray]] | None = None
                     ) -> dict[int, dict[str, float]]:
    """``{task: {"acc": .., "auc": ..}}`` of ``model`` on ``dataset``; with ``keep``, also
    ``keep[task] = {"probs": [n, C], "labels": [n]}`` (what the bootstrap needs)."""
    out = predict_probs(model, dataset, device, tasks)
    if keep is not None:
        keep.update({t: {"probs": p.astype(np.float32), "labels": y} for t, (p, y) in out.items()})
    return {t: {"acc": M.accuracy(p, y), "auc": M.roc_auc(p, y)} for t, (p, y) in out.items()}
