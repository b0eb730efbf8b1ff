"""The classification recipe: teacher -> decompose -> baselines -> export -> evaluate -> report.

Each stage reads what earlier stages wrote under the run folder and writes its own
sub-folder, so stages can run one at a time (``lorkd pretrain``, ``decompose``, ...) or all
together (``lorkd run``). A finished stage is reused, an interrupted one resumes from its
``checkpoints/latest.pt`` when ``resume`` is set. Model selection uses the validation split
only; the test split is read for the final metrics alone.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import to_dict
from ..data.medmnist import ClassificationTask, load_npz_task
from ..data.multitask import MultiTaskDataset, TaskBatchSampler, collate_task_batch
from ..data.paths import shared_data_dir
from ..data.synthetic import make_synthetic_tasks
from ..distill import FeatureProjector
from ..engine import metrics as M
from ..engine.checkpoint import load_checkpoint
from ..engine.distributed import DistributedContext
from ..engine.trainer import FitConfig, fit
from ..errors import DataError
from ..experts import save_expert
from ..fileio import read_json, write_json
from ..models.backbones import backbone_spec
from ..models.classifier import MultiTaskClassifier
from .common import DistillObjective, has_network, load_network, save_network, timed
from .schema import ClassificationConfig, Distill, Stage

log = logging.getLogger("lorkd")


# ---------------------------------------------------------------------------------------- data
def load_tasks(cfg: ClassificationConfig) -> list[ClassificationTask]:
    """The tasks of the config: its ``.npz`` files, or the embedded synthetic set.

    A relative path that does not exist is looked up under the shared data folder.
    """
    if cfg.data.synthetic is not None:
        s = cfg.data.synthetic
        return make_synthetic_tasks(s.num_tasks, s.size, s.n_train, s.n_val, s.n_test, s.seed)
    tasks = []
    for spec in cfg.data.tasks:
        path = Path(spec.path).expanduser()
        if not path.is_absolute() and not path.exists() and (shared_data_dir() / path).exists():
            path = shared_data_dir() / path
        tasks.append(load_npz_task(path, name=spec.name, num_classes=spec.num_classes))
    return tasks


def make_dataset(cfg: ClassificationConfig, tasks: list[ClassificationTask], split: str, augment: bool = False) -> MultiTaskDataset:
    d = cfg.data
    return MultiTaskDataset(tasks, split, size=d.size, channels=d.channels, augment=augment and d.augment,
                            mean=d.mean, std=d.std, seed=cfg.seed)


def data_summary(tasks: list[ClassificationTask]) -> list[dict[str, Any]]:
    return [{"name": t.name, "source": str(t.source), "num_classes": t.num_classes, "channels": t.channels,
             **{f"n_{s}": t.num_samples(s) for s in ("train", "val", "test")}} for t in tasks]


# ---------------------------------------------------------------------------------------- models
class Run:
    """Shared state of one run: config, tasks, datasets, device, output folder."""

    def __init__(self, cfg: ClassificationConfig, out: Path, ctx: DistributedContext, resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg, self.out, self.ctx, self.resume, self.progress = cfg, Path(out), ctx, resume, progress
        self.tasks = load_tasks(cfg)
        self.names = [t.name for t in self.tasks]
        self.train_set = make_dataset(cfg, self.tasks, "train", augment=True)
        self.val_set = make_dataset(cfg, self.tasks, "val")
        self.test_set = make_dataset(cfg, self.tasks, "test")
        self.channels = self.train_set.channels
        self.num_classes = [t.num_classes for t in self.tasks]
        self.timing: dict[str, float] = {}

    def spec(self, net) -> dict[str, Any]:
        return backbone_spec(net.arch, 2, self.channels, net.widen, net.conv1_stride, net.kwargs)

    def network(self, net, num_classes: list[int], experts: dict[str, Any] | None = None) -> MultiTaskClassifier:
        torch.manual_seed(self.cfg.seed)
        return MultiTaskClassifier(self.spec(net), num_classes, experts)

    def fit(self, model: nn.Module, stage: Stage, folder: Path, objective, task_subset: list[int] | None = None,
            extra: nn.Module | None = None) -> nn.Module:
        """Train ``model`` on the train split (of ``task_subset`` only, if given); select on val."""
        train = self.dataset("train", task_subset)
        sampler = TaskBatchSampler(train, stage.batch_size, mode=self.cfg.data.sampler, seed=self.cfg.seed,
                                   num_replicas=self.ctx.world_size, rank=self.ctx.rank, drop_last=self.ctx.is_distributed)
        fit_cfg = FitConfig(epochs=stage.epochs, batch_size=stage.batch_size, optim=stage.optim,
                            seed=self.cfg.seed, checkpoint_every=stage.checkpoint_every, select_metric="acc",
                            num_workers=self.cfg.num_workers, progress=self.progress, stage=folder.name)
        model = model.to(self.ctx.device)
        evaluate = lambda m: self.val_metrics(m, task_subset)  # noqa: E731
        fit(model, objective, train, sampler, fit_cfg, folder, self.ctx, evaluate=evaluate, extra_modules=extra,
            resume=self.resume and (folder / "checkpoints" / "latest.pt").is_file(),
            task_names=[self.names[t] for t in (task_subset or range(len(self.tasks)))])
        best = folder / "checkpoints" / "best.pt"
        if best.is_file():  # the epoch with the best validation accuracy
            model.load_state_dict(load_checkpoint(best)["model"])
        return model

    def dataset(self, split: str, tasks: list[int] | None = None) -> MultiTaskDataset:
        """The ``split`` of all tasks, or of ``tasks`` only (then task ids index that list)."""
        if tasks is None:
            return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        return make_dataset(self.cfg, [self.tasks[t] for t in tasks], split, augment=split == "train")

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

    ``model`` is a :class:`MultiTaskClassifier` (any task) or a plain network of one task (then
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
            if isinstance(model, MultiTaskClassifier) or hasattr(model, "module"):
                logits = model(batch.images, batch.task_ids).logits[task]
            else:
                logits = model(batch.images)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels = dataset.labels[idx].numpy()
        result[task] = (np.concatenate(probs), labels)
    model.train(was_training)
    return result


def evaluate_network(model: nn.Module, dataset: MultiTaskDataset, device: torch.device,
                     tasks: list[int] | None = None) -> dict[int, dict[str, float]]:
    """``{task: {"acc": .., "auc": ..}}`` of ``model`` on ``dataset``."""
    return {t: {"acc": M.accuracy(p, y), "auc": M.roc_auc(p, y)}
            for t, (p, y) in predict_probs(model, dataset, device, tasks).items()}


# ---------------------------------------------------------------------------------------- stages
def _build_from_meta(meta: dict[str, Any]) -> MultiTaskClassifier:
    return MultiTaskClassifier(meta["backbone"], meta["num_classes"], meta.get("experts"))


def _meta(model: MultiTaskClassifier, run: Run, kind: str, tasks: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    tasks = tasks if tasks is not None else list(range(len(run.tasks)))
    return {"kind": kind, "backbone": model.backbone_spec, "num_classes": model.num_classes,
            "tasks": [run.names[t] for t in tasks], "channels": run.channels, "size": run.cfg.data.size,
            "mean": run.cfg.data.mean, "std": run.cfg.data.std, **extra}


def stage_teacher(run: Run) -> MultiTaskClassifier:
    """Train the foundation model on all tasks (or load ``teacher.checkpoint``); writes ``teacher/``."""
    folder = run.out / "teacher"
    source = Path(run.cfg.teacher.checkpoint) if run.cfg.teacher.checkpoint else folder
    if has_network(source):
        teacher, meta = load_network(source, _build_from_meta)
        if meta.get("tasks") != run.names:
            raise DataError(f"{source / 'model.json'}: teacher was trained on tasks {meta.get('tasks')}, "
                            f"this config has {run.names}")
        return teacher.to(run.ctx.device)
    if run.cfg.teacher.checkpoint:
        raise DataError(f"teacher.checkpoint {source}: no model.safetensors + model.json there")
    with timed(run.timing, "teacher"):
        model = run.network(run.cfg.teacher.net, run.num_classes)
        objective = DistillObjective(Distill(kd_weight=0.0), world_size=run.ctx.world_size)
        model = run.fit(model, run.cfg.teacher.train, folder, objective)
        if run.ctx.is_main:
            save_network(model, folder, _meta(model, run, "teacher"))
    return model


def stage_student(run: Run, teacher: MultiTaskClassifier, name: str = "student", distill: Distill | None = None) -> MultiTaskClassifier:
    """Decompose: train the student with experts, distilling from ``teacher``; writes ``student/``."""
    folder = run.out / name
    if has_network(folder):
        return load_network(folder, _build_from_meta)[0].to(run.ctx.device)
    sc = run.cfg.student
    distill = distill or sc.distill
    with timed(run.timing, name):
        model = run.network(sc.net, run.num_classes, sc.experts.as_kwargs())
        projector = FeatureProjector(model.feature_dim, teacher.feature_dim) if distill.feat_weight > 0 else None
        objective = DistillObjective(distill, teacher, projector, run.ctx.world_size)
        model = run.fit(model, sc.train, folder, objective, extra=projector)
        if run.ctx.is_main:
            save_network(model, folder, _meta(model, run, "student", experts=sc.experts.as_kwargs()))
    return model


def stage_baselines(run: Run, teacher: MultiTaskClassifier) -> dict[str, Any]:
    """Train the baselines listed in ``baselines.run`` with the student's network and budget."""
    sc = run.cfg.student
    trained: dict[str, Any] = {}
    for name in run.cfg.baselines.run:
        kd = name.endswith("_kd")
        distill = sc.distill if kd else replace(sc.distill, kd_weight=0.0, feat_weight=0.0)
        if name == "student_nokd":
            trained[name] = stage_student(run, teacher, name="baselines/student_nokd", distill=distill)
            continue
        groups = [[t] for t in range(len(run.tasks))] if name.startswith("stl") else [list(range(len(run.tasks)))]
        models = {}
        for tasks in groups:
            folder = run.out / "baselines" / name / ("_".join(run.names[t] for t in tasks) if len(tasks) == 1 else "all")
            if has_network(folder):
                models[tuple(tasks)] = load_network(folder, _build_from_meta)[0].to(run.ctx.device)
                continue
            with timed(run.timing, f"baseline_{name}"):
                model = run.network(sc.net, [run.num_classes[t] for t in tasks])
                sub_teacher = _TaskRemap(teacher, tasks) if kd else None
                projector = FeatureProjector(model.feature_dim, teacher.feature_dim) if kd and distill.feat_weight > 0 else None
                objective = DistillObjective(distill, sub_teacher, projector, run.ctx.world_size)
                model = run.fit(model, sc.train, folder, objective, task_subset=tasks, extra=projector)
                if run.ctx.is_main:
                    save_network(model, folder, _meta(model, run, name, tasks=tasks))
            models[tuple(tasks)] = model
        trained[name] = models
    return trained


class _TaskRemap(nn.Module):
    """The teacher seen through a subset of its tasks (local id ``i`` -> teacher task ``tasks[i]``)."""

    def __init__(self, teacher: MultiTaskClassifier, tasks: list[int]) -> None:
        super().__init__()
        self.teacher = teacher
        self.map = torch.tensor(tasks)

    def forward(self, x, task_ids):
        out = self.teacher(x, self.map.to(task_ids.device)[task_ids])
        inverse = {int(self.map[i]): i for i in range(len(self.map))}
        out.logits = {inverse[t]: v for t, v in out.logits.items()}
        out.rows = {inverse[t]: v for t, v in out.rows.items()}
        return out


def stage_export(run: Run, student: MultiTaskClassifier) -> dict[str, Path]:
    """Write one plain expert per task to ``experts/<task>/`` (safetensors + card.json)."""
    folders = {}
    for t, name in enumerate(run.names):
        expert, spec = student.export_task(t)
        card = {"task": name, "task_id": t, "classes": run.num_classes[t], "input_channels": run.channels,
                "input_size": run.cfg.data.size or list(run.tasks[t].image_size),
                "normalisation": {"mean": run.cfg.data.mean, "std": run.cfg.data.std, "scale": "x / 255"},
                "rebuild_without_lorkd": "nn.Sequential(OrderedDict(backbone=<architecture.kwargs.backbone.factory>"
                                         "(**kwargs), head=nn.Linear(feature_dim, num_classes)))"}
        folders[name] = save_expert(expert, run.out / "experts" / name, architecture=spec, card=card)
    return folders


def stage_evaluate(run: Run, teacher: MultiTaskClassifier, student: MultiTaskClassifier, baselines: dict[str, Any]) -> dict[str, Any]:
    """Metrics of every model on val and test, sizes, FLOPs and latency; writes ``metrics.json``."""
    from ..experts import load_expert

    dev = run.ctx.device
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {"val": {}, "test": {}}
    for split, dataset in (("val", run.val_set), ("test", run.test_set)):
        table = {name: {} for name in run.names}
        for label, model in (("teacher", teacher), ("student", student)):
            for t, m in evaluate_network(model, dataset, dev).items():
                table[run.names[t]][label] = m
        for t, name in enumerate(run.names):
            expert = load_expert(run.out / "experts" / name).to(dev)
            table[name]["expert"] = evaluate_network(expert, dataset, dev, [t])[t]
        for bname, models in baselines.items():
            if isinstance(models, nn.Module):  # student_nokd: a full student
                for t, m in evaluate_network(models, dataset, dev).items():
                    table[run.names[t]][bname] = m
                continue
            for tasks, model in models.items():
                sub = run.dataset(split, list(tasks))
                for local, m in evaluate_network(model, sub, dev).items():
                    table[run.names[tasks[local]]][bname] = m
        results[split] = table
    example = run.test_set[0][0][None]
    teacher_plain = teacher.export_task(0)[0].cpu()
    expert_plain = load_expert(run.out / "experts" / run.names[0]).cpu()
    ev = run.cfg.evaluate
    batch = example.repeat(ev.latency_batch, 1, 1, 1)
    metrics = {
        "task_kind": "classification", "metric_keys": ["acc", "auc"], "primary_metric": "acc", "split": "test",
        "tasks": results["test"], "val": results["val"],
        "params": {"teacher": M.count_parameters(teacher), "teacher_backbone_and_one_head": M.count_parameters(teacher_plain),
                   "student": M.count_parameters(student), "expert": M.count_parameters(expert_plain)},
        "flops": {"teacher": M.count_flops(teacher_plain, example), "expert": M.count_flops(expert_plain, example)},
        "latency_ms": {"teacher": M.cpu_latency_ms(teacher_plain, batch, ev.latency_repeats) / ev.latency_batch,
                       "expert": M.cpu_latency_ms(expert_plain, batch, ev.latency_repeats) / ev.latency_batch},
        "latency_batch": ev.latency_batch,
        "data": data_summary(run.tasks),
        "models": MODEL_DESCRIPTIONS,
    }
    return metrics


MODEL_DESCRIPTIONS = {
    "teacher": "foundation model trained on all tasks (shared backbone, one head per task)",
    "student": "LoRKD student: small backbone + one low-rank expert per task, routed by task id",
    "expert": "the exported plain expert of the task (student with its expert merged, + its head)",
    "stl": "student network trained on the task alone",
    "stl_kd": "student network trained on the task alone, with the teacher's distillation",
    "mtl": "student network, shared backbone, one head per task, no experts",
    "mtl_kd": "MTL with the teacher's distillation",
    "student_nokd": "LoRKD student without distillation (kd_weight = feat_weight = 0)",
}


# ---------------------------------------------------------------------------------------- driver
STAGES = ("teacher", "student", "baselines", "export", "evaluate")


def run_stages(cfg: ClassificationConfig, out: Path, ctx: DistributedContext, stages: tuple[str, ...] = STAGES,
               resume: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Run ``stages`` in order; earlier stages' outputs are reused when present.

    Returns the metrics when ``evaluate`` ran (on rank 0), else ``None``.
    """
    run = Run(cfg, out, ctx, resume=resume, progress=progress)
    teacher = stage_teacher(run)
    if stages == ("teacher",):
        return None
    student = stage_student(run, teacher) if "student" in stages or has_network(out / "student") else None
    if student is None:
        raise DataError(f"{out / 'student'}: no trained student; run `lorkd decompose` first")
    baselines = stage_baselines(run, teacher) if "baselines" in stages or "evaluate" in stages else {}
    if not ctx.is_main:
        return None
    if "export" in stages or "evaluate" in stages:
        with timed(run.timing, "export"):
            stage_export(run, student)
    if "evaluate" not in stages:
        return None
    with timed(run.timing, "evaluate"):
        metrics = stage_evaluate(run, teacher, student, baselines)
    previous = read_json(out / "metrics.json").get("timing_s", {}) if (out / "metrics.json").is_file() else {}
    metrics["timing_s"] = {**previous, **run.timing}
    metrics["config"] = to_dict(cfg)
    write_json(out / "metrics.json", metrics)
    return metrics
