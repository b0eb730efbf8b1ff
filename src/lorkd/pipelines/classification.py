"""The classification recipe: teacher -> decompose -> baselines -> export -> evaluate -> report.

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

from ..data.medmnist import ClassificationTask, cap_train, load_npz_task
from ..data.multitask import MultiTaskDataset, collate_task_batch
from ..data.paths import locate
from ..data.synthetic import make_synthetic_tasks
from ..engine import metrics as M
from ..engine.distributed import DistributedContext
from ..errors import ConfigError, DataError
from ..experts import save_expert
from ..models.backbones import backbone_spec
from ..models.classifier import MultiTaskClassifier
from ..models.multitask import MultiTaskNet
from ..report.stats import majority_rate, run_statistics, save_predictions
from .common import baseline_parameters, drive, fit_stage
from .schema import ClassificationConfig, Stage

log = logging.getLogger("lorkd")


# ---------------------------------------------------------------------------------------- data
def load_tasks(cfg: ClassificationConfig) -> list[ClassificationTask]:
    """The tasks of the config: its ``.npz`` files, or the embedded synthetic set, each capped to
    ``data.max_train`` training images (:func:`~lorkd.data.medmnist.cap_train`, seed
    ``data.cap_seed``: the same subset for every model and seed).

    A relative path that does not exist is looked up under the shared data folder.

    Raises:
        DataError: a file is missing (the message lists the places searched) or fails the checks
            of :func:`~lorkd.data.medmnist.load_npz_task`; the message starts with the config key
            ``data.tasks[i]`` and names the file.
    """
    d = cfg.data
    if d.synthetic is not None:
        s = d.synthetic
        tasks = make_synthetic_tasks(s.num_tasks, s.size, s.n_train, s.n_val, s.n_test, s.seed)
        return [cap_train(t, d.max_train, d.cap_seed) for t in tasks]
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


def data_summary(tasks: list[ClassificationTask], teacher_n_train: list[int] | None = None) -> list[dict[str, Any]]:
    """Per task: name, source, classes, channels, sizes and ``n_<split>`` (with ``teacher_n_train``:
    also ``n_train_teacher``, when a run's teacher trains on more images than its students)."""
    rows = [{"name": t.name, "source": str(t.source), "num_classes": t.num_classes, "channels": t.channels,
             "spatial_dims": t.spatial_dims, "image_size": list(t.image_size),
             **{f"n_{s}": t.num_samples(s) for s in ("train", "val", "test")}} for t in tasks]
    for row, n in zip(rows, teacher_n_train or []):
        row["n_train_teacher"] = n
    return rows


# ---------------------------------------------------------------------------------------- models
class Run:
    """Shared state of one run: config, tasks, datasets, device, output folder."""

    def __init__(self, cfg: ClassificationConfig, out: Path, ctx: DistributedContext, resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg, self.out, self.ctx, self.resume, self.progress = cfg, Path(out), ctx, resume, progress
        pool = load_tasks(cfg)
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
        self.timing: dict[str, float] = {}

    def spec(self, net) -> dict[str, Any]:
        return backbone_spec(net.arch, self.spatial_dims, self.channels, net.widen, net.conv1_stride, net.kwargs)

    def network(self, net, num_classes: list[int], experts: dict[str, Any] | None = None) -> MultiTaskClassifier:
        torch.manual_seed(self.cfg.seed)
        return MultiTaskClassifier(self.spec(net), num_classes, experts)

    def fit(self, model: nn.Module, stage: Stage, folder: Path, objective, task_subset: list[int] | None = None,
            extra: nn.Module | None = None, train_set: MultiTaskDataset | None = None) -> nn.Module:
        """Train ``model`` on ``train_set`` (default: the train split, of ``task_subset`` only if
        given); select on val."""
        train_set = self.dataset("train", task_subset) if train_set is None else train_set
        return fit_stage(model, objective, train_set, stage, folder, self.ctx,
                         seed=self.cfg.seed, num_workers=self.cfg.num_workers, progress=self.progress,
                         resume=self.resume, evaluate=lambda m: self.val_metrics(m, task_subset),
                         select_metric=self.select_metric,
                         task_names=[self.names[t] for t in (task_subset or range(len(self.tasks)))],
                         sampler_mode=self.cfg.data.sampler, extra=extra,
                         tensorboard=self.cfg.logging.tensorboard)

    # hooks of the shared stages (lorkd.pipelines.common)
    task_loss = None  # cross-entropy
    select_metric = "acc"  # the key of val_metrics that selects models

    def meta(self, model: MultiTaskClassifier, kind: str, tasks: list[int] | None = None, **extra: Any) -> dict[str, Any]:
        return _meta(model, self, kind, tasks, **extra)

    build = staticmethod(lambda meta: _build_from_meta(meta))

    def dataset(self, split: str, tasks: list[int] | None = None) -> MultiTaskDataset:
        """The ``split`` of all tasks, or of ``tasks`` only (then task ids index that list)."""
        if tasks is None:
            return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        # a subset keeps the run's channel count: every network of the run takes the same input
        return make_dataset(self.cfg, [self.tasks[t] for t in tasks], split, augment=split == "train",
                            channels=self.channels)

    def val_metrics(self, model: nn.Module, tasks: list[int] | None = None) -> dict[str, float]:
        """Mean validation accuracy and AUC over ``tasks`` (the selection criterion is ``acc``)."""
        per_task = evaluate_network(model, self.dataset("val", tasks), self.ctx.device)
        names = self.names if tasks is None else [self.names[t] for t in tasks]
        out = {"acc": float(np.mean([m["acc"] for m in per_task.values()])),
               "auc": float(np.mean([m["auc"] for m in per_task.values()]))}
        out.update({f"acc_{names[t]}": m["acc"] for t, m in per_task.items()})
        return out


@torch.no_grad()
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
            if isinstance(model, MultiTaskNet) or hasattr(model, "module"):
                logits = model(batch.images, batch.task_ids).logits[task]
            else:
                logits = model(batch.images)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels = dataset.labels[idx].numpy()
        result[task] = (np.concatenate(probs), labels)
    model.train(was_training)
    return result


def evaluate_network(model: nn.Module, dataset: MultiTaskDataset, device: torch.device,
                     tasks: list[int] | None = None, keep: dict[int, dict[str, np.ndarray]] | None = None
                     ) -> dict[int, dict[str, float]]:
    """``{task: {"acc": .., "auc": ..}}`` of ``model`` on ``dataset``; with ``keep``, also
    ``keep[task] = {"probs": [n, C], "labels": [n]}`` (what the bootstrap needs)."""
    out = predict_probs(model, dataset, device, tasks)
    if keep is not None:
        keep.update({t: {"probs": p.astype(np.float32), "labels": y} for t, (p, y) in out.items()})
    return {t: {"acc": M.accuracy(p, y), "auc": M.roc_auc(p, y)} for t, (p, y) in out.items()}


# ---------------------------------------------------------------------------------------- stages
def _build_from_meta(meta: dict[str, Any]) -> MultiTaskClassifier:
    return MultiTaskClassifier(meta["backbone"], meta["num_classes"], meta.get("experts"))


def _meta(model: MultiTaskClassifier, run: Run, kind: str, tasks: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    tasks = tasks if tasks is not None else list(range(len(run.tasks)))
    return {"kind": kind, "backbone": model.backbone_spec, "num_classes": model.num_classes,
            "tasks": [run.names[t] for t in tasks], "channels": run.channels, "size": run.cfg.data.size,
            "spatial_dims": run.spatial_dims,
            "mean": run.cfg.data.mean, "std": run.cfg.data.std, **extra}


def stage_export(run: Run, student: MultiTaskClassifier) -> dict[str, Path]:
    """Write one plain expert per task to ``experts/<task>/`` (safetensors + card.json, and the
    ``export`` formats: ONNX, TorchScript, each checked against PyTorch)."""
    from .export_formats import class_names, write_formats

    folders = {}
    for t, name in enumerate(run.names):
        expert, spec = student.export_task(t)
        card = {"task": name, "task_id": t, "classes": run.num_classes[t], "input_channels": run.channels,
                "input_size": run.cfg.data.size or list(run.tasks[t].image_size), "spatial_dims": run.spatial_dims,
                "normalisation": {"mean": run.cfg.data.mean, "std": run.cfg.data.std, "scale": "x / 255"},
                "rebuild_without_lorkd": "nn.Sequential(OrderedDict(backbone=<architecture.kwargs.backbone.factory>"
                                         "(**kwargs), head=nn.Linear(feature_dim, num_classes)))"}
        given = run.cfg.data.tasks[t].class_names if run.cfg.data.tasks else None
        names = class_names(run.tasks[t].source, run.num_classes[t], given, f"data.tasks[{t}].class_names")
        if names is not None:
            card["class_names"] = names
        ex = run.cfg.export
        card["files"] = write_formats(expert, run.out / "experts" / name, run.dataset("test", [t])[0][0].shape,
                                      onnx=ex.onnx, torchscript=ex.torchscript, opset=ex.opset)
        folders[name] = save_expert(expert, run.out / "experts" / name, architecture=spec, card=card)
    return folders


def stage_evaluate(run: Run, teacher: MultiTaskClassifier, student: MultiTaskClassifier, baselines: dict[str, Any]) -> dict[str, Any]:
    """Metrics of every model on val and test, sizes, FLOPs and latency; writes ``metrics.json``."""
    from ..experts import load_expert

    dev = run.ctx.device
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {"val": {}, "test": {}}
    outputs: dict[str, dict[str, dict[str, np.ndarray]]] = {name: {} for name in run.names}  # test, per sample
    for split, dataset in (("val", run.val_set), ("test", run.test_set)):
        table = {name: {} for name in run.names}

        def score(label: str, model: nn.Module, data: MultiTaskDataset, tasks: list[int] | None = None,
                  names: list[str] = run.names) -> None:
            kept: dict[int, dict[str, np.ndarray]] = {}
            for t, m in evaluate_network(model, data, dev, tasks, keep=kept if split == "test" else None).items():
                table[names[t]][label] = m
                if split == "test":
                    outputs[names[t]][label] = kept[t]

        for label, model in (("teacher", teacher), ("student", student)):
            score(label, model, dataset)
        for t, name in enumerate(run.names):
            score("expert", load_expert(run.out / "experts" / name).to(dev), dataset, [t])
        for bname, models in baselines.items():
            if isinstance(models, nn.Module):  # student_nokd: a full student
                score(bname, models, dataset)
                continue
            for tasks, model in models.items():
                score(bname, model, run.dataset(split, list(tasks)), names=[run.names[t] for t in tasks])
        results[split] = table
    save_predictions(run.out, outputs)
    example = run.test_set[0][0][None]
    teacher_plain = teacher.export_task(0)[0].cpu()
    expert_plain = load_expert(run.out / "experts" / run.names[0]).cpu()
    ev = run.cfg.evaluate
    batch = example.repeat(ev.latency_batch, *([1] * (example.ndim - 1)))
    metrics = {
        "task_kind": "classification", "metric_keys": ["acc", "auc"], "primary_metric": "acc", "split": "test",
        "tasks": results["test"], "val": results["val"],
        "params": {"teacher": M.count_parameters(teacher), "teacher_backbone_and_one_head": M.count_parameters(teacher_plain),
                   "student": M.count_parameters(student), "expert": M.count_parameters(expert_plain)},
        "flops": {"teacher": M.count_flops(teacher_plain, example), "expert": M.count_flops(expert_plain, example)},
        "latency_ms": {"teacher": M.cpu_latency_ms(teacher_plain, batch, ev.latency_repeats) / ev.latency_batch,
                       "expert": M.cpu_latency_ms(expert_plain, batch, ev.latency_repeats) / ev.latency_batch},
        "latency_batch": ev.latency_batch,
        "data": data_summary(run.tasks, run.teacher_train_set.task_sizes
                             if run.teacher_train_set is not run.train_set else None),
        "models": MODEL_DESCRIPTIONS,
        "majority": {t.name: majority_rate(t.labels["train"], t.num_classes,
                                           {s: t.labels[s] for s in ("val", "test") if s in t.labels})
                     for t in run.tasks},
    }
    metrics["params"].update(baseline_parameters(baselines))
    metrics["statistics"] = run_statistics(outputs, metrics["metric_keys"], "acc", results["val"], list(baselines))
    return metrics



MODEL_DESCRIPTIONS = {
    "teacher": "foundation model trained on all tasks (shared backbone, one head per task)",
    "student": "LoRKD student: small backbone + one low-rank expert per task, routed by task id",
    "expert": "the exported plain expert of the task (student with its expert merged, + its head)",
    "stl": "student network trained on the task alone",
    "stl_kd": "student network trained on the task alone, with the teacher's distillation",
    "mtl": "student network, shared backbone, one head per task, no experts",
    "mtl_kd": "MTL with the teacher's distillation",
    "student_nokd": "LoRKD student without distillation (kd_weight = feat_weight = 0, no feature pairs)",
}


# ---------------------------------------------------------------------------------------- driver
STAGES = ("teacher", "student", "baselines", "export", "evaluate")


def run_stages(cfg: ClassificationConfig, out: Path, ctx: DistributedContext, stages: tuple[str, ...] = STAGES,
               resume: bool = False, progress: bool = True, reuse: bool = False) -> dict[str, Any] | None:
    """Run ``stages`` in order; earlier stages' outputs are reused when present (when their
    fingerprint matches the config, or with ``reuse``: see :func:`~lorkd.pipelines.common.drive`).

    Returns the metrics when ``evaluate`` ran (on rank 0), else ``None``.
    """
    run = Run(cfg, out, ctx, resume=resume, progress=progress)  # reads and checks the data first
    return drive(run, stages, stage_export, stage_evaluate, reuse=reuse)
