"""``lorkd transfer``: a foundation model and its experts on downstream tasks they have not seen.

The foundation model is a lorkd run's teacher or any model of ``foundation.source``
(:mod:`lorkd.pipelines.recipes.transfer_foundation`); either way a backbone giving features ``[B, F]``.

For each downstream task and seed, every method of ``methods`` is trained with the same budget
(``train``), augmentation and selection on validation (the epoch with the best validation accuracy,
or Dice for segmentation), then read once on test. Classification (2D and 3D) and segmentation
(a segmentation foundation run, ``data.segmentation``; heads are 1x1 convolutions, the loss
Dice + CE, the metric mean foreground Dice on whole volumes) share everything else.
Methods (``K`` the task's classes; ``F`` a backbone's feature width):

* ``scratch``: the student expert's architecture, random initialisation, trained end to end.
* ``foundation_ft`` / ``foundation_lp``: the foundation backbone + a new ``Linear(F, K)`` head,
  fine-tuned / linear-probed (backbone frozen: no gradients, BatchNorm statistics fixed).
* ``expert_ft`` / ``expert_lp``: the same from each expert's backbone (its old head is dropped).
* ``foundation_lora``: the frozen foundation with lorkd's low-rank expert layers for one task
  (``lorkd.add_experts(..., num_tasks=1)``) + a new head; only adapters and head train.
* ``kd``: the student architecture trained with CE + soft-target KD from the foundation model
  whose head was fitted on the task (the ``foundation_lp`` model, trained first).
* ``rd``: Reprogramming Distillation (:mod:`lorkd.distill.reprogram`); the student is exported.

Outputs under ``--out``: ``<task>/seed<k>/<method>[-<expert>]/`` with ``history.jsonl``,
``result.json`` and the trained model (``model/``: a plain ``nn.Sequential(backbone, head)`` in the
expert format, runnable with ``lorkd predict``; ``foundation_lp`` keeps only ``head.safetensors``,
its backbone being the foundation run's teacher), ``metrics.json``, ``report.md`` and
``plots/transfer_<task>.png``. A finished method (``result.json``) is reused when the command is
run again with ``--resume``; an interrupted one resumes from its ``checkpoints/latest.pt``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ...config import to_dict, write_config
from ...data.medmnist import ClassificationTask, cap_train, load_npz_task
from ...data.multitask import MultiTaskDataset
from ...data.paths import locate
from ...distill import dice_ce_loss, soft_target_kd
from ...distill.reprogram import ReprogrammingDistiller, freeze, pointwise, rd_loss
from ...engine import metrics as M
from ...engine.checkpoint import load_checkpoint
from ...engine.distributed import DistributedContext
from ...engine.trainer import StepLoss
from ...errors import ConfigError, DataError
from ...experts import add_experts, build_architecture, load_expert, save_expert
from ...fileio import read_json, write_json
from ...models.classifier import Classifier, plain_spec
from ...models.taps import find_layer
from ...report.transfer import BOOTSTRAP_NOTE, bootstrap_interval, item_statistic, majority_warnings, write_transfer_report
from ..core.recipe import Recipe
from ..core.runfolder import runtime_line
from ..core.scoring import predict_probs
from ..schema import METHODS, SegmentationConfig, TransferConfig
from .segmentation import SegmentationRecipe, expert_card, predict_case
from .transfer_foundation import TransferFoundation, load_transfer_foundation, train_only_used

log = logging.getLogger("lorkd")

EXPERT_METHODS = ("expert_ft", "expert_lp")


# ---------------------------------------------------------------------------------------- data
def downstream_path(spec: Any, key: str, foundation: Any, decomposed: set[Path]) -> Path:
    """The file or folder of downstream task ``spec`` (config key ``key``).

    Raises:
        ConfigError: the task (by name, or by its file) is one the foundation model and its
            experts were trained on: transfer is measured on tasks they have not seen.
        DataError: the path exists nowhere (the places searched are listed).
    """
    path = Path(spec.path) if spec.name in foundation.tasks else locate(spec.path, f"{key}.path")
    if spec.name in foundation.tasks or path.resolve() in decomposed:
        raise ConfigError(f"{key}: task {spec.name!r} ({path}) is one of the tasks the foundation model and its "
                          f"experts were trained on ({', '.join(foundation.tasks)}); transfer is measured on "
                          "tasks they have not seen")
    return path


def load_downstream(cfg: TransferConfig, foundation: TransferFoundation) -> list[ClassificationTask]:
    """The downstream tasks, checked against the foundation model and capped to ``data.max_train``.

    Raises:
        ConfigError: a task (by name or file) was one of the decomposed tasks.
        DataError: a file is unreadable, or its images do not fit the foundation model (2D vs 3D,
            channels that cannot be mapped); the message names the file.
    """
    decomposed = {p.resolve() for p in foundation.task_files}
    tasks = []
    for i, spec in enumerate(cfg.data.tasks):
        key = f"data.tasks[{i}]"
        path = downstream_path(spec, key, foundation, decomposed)
        task = load_npz_task(path, name=spec.name, num_classes=spec.num_classes, spatial_dims=spec.spatial_dims)
        if task.spatial_dims != foundation.spatial_dims:
            raise DataError(f"{key} ({path}): holds {task.spatial_dims}D inputs but the foundation model takes "
                            f"{foundation.spatial_dims}D inputs")
        if not (task.channels == foundation.channels or 1 in (task.channels, foundation.channels)):
            raise DataError(f"{key} ({path}): images have {task.channels} channels but the foundation model takes "
                            f"{foundation.channels}; only 1 <-> C channels are mapped (repeat / average)")
        if task.channels != foundation.channels:
            (log.warning if foundation.channels == 1 else log.info)(
                "transfer: task %s (%s): %s", spec.name, path, channel_mapping(task.channels, foundation.channels))
        tasks.append(cap_train(task, cfg.data.max_train, cfg.data.cap_seed))
    return tasks


def channel_mapping(have: int, want: int) -> str:
    """How ``have`` image channels are fed to a foundation model of ``want`` channels (as
    :class:`~lorkd.data.multitask.MultiTaskDataset` maps them): unchanged, averaged to gray, or the
    gray channel repeated."""
    if have == want:
        return f"{have} channel(s), as the foundation model takes"
    if want == 1:
        return f"{have} channels averaged to the 1 (gray) channel the foundation model takes"
    return f"1 (gray) channel repeated to the {want} channels the foundation model takes"


def transfer_startup_summary(run: "TransferRun") -> str:
    """One block of text before anything trains: seeds, device, threads, world size, output folder,
    the foundation model (source, tasks, input) and per downstream task its split sizes, classes,
    channels (and how they are mapped to the foundation's) and source."""
    f, cfg = run.foundation, run.cfg
    size = f"size {run.size}" if run.size is not None else "the images' own size"
    lines = [runtime_line(run.ctx, f"seeds {list(cfg.seeds)}", run.out),
             f"  foundation: {f.source} (trained on {', '.join(f.tasks) or '?'}; input {f.channels} channel(s), "
             f"{f.spatial_dims}D, {size}; experts {', '.join(run.experts) or 'none'}, student {run.student_name})",
             f"  methods: {', '.join(cfg.methods)}; {cfg.train.epochs} epoch(s), batch {cfg.train.batch_size}"]
    for task in run.tasks:
        if run.dense:
            counts, unit, channels = task.n_cases, "cases", f.channels
        else:
            counts = {s: task.num_samples(s) for s in ("train", "val", "test")}
            unit, channels = "images", task.channels
        lines.append(f"  task {task.name}: {', '.join(f'{s} {counts.get(s, 0)}' for s in ('train', 'val', 'test'))} "
                     f"({unit}; {task.num_classes} classes; {channel_mapping(channels, f.channels)}; {task.source})")
    return "\n".join(lines)


@dataclass
class SegDownstream:
    """One segmentation downstream task: its single-task segmentation config and folder.

    :meth:`data` builds the :class:`~lorkd.pipelines.recipes.segmentation.SegmentationRecipe` on it (patient split
    written to ``folder/split_<task>.json`` and reused by every seed and method)."""

    name: str
    num_classes: int
    source: str
    config: SegmentationConfig  # with this task only
    folder: Path
    n_cases: dict[str, int]

    def data(self, seed: int, ctx: DistributedContext) -> SegmentationRecipe:
        return SegmentationRecipe(dataclasses.replace(self.config, seed=seed), self.folder, ctx, progress=False)


def load_seg_downstream(cfg: TransferConfig, foundation: TransferFoundation, out: Path, ctx: DistributedContext) -> list[SegDownstream]:
    """The segmentation downstream tasks of ``data.segmentation``, checked against the foundation.

    Raises:
        ConfigError: a task (by name or folder) was one of the decomposed tasks.
        DataError: its volumes do not fit the foundation model (spatial dims of the patches,
            channels); the message names the task's folder.
    """
    d = cfg.data.segmentation
    decomposed = {p.resolve() for p in foundation.task_files}
    tasks = []
    for i, spec in enumerate(d.tasks):
        key = f"data.segmentation.tasks[{i}]"
        path = downstream_path(spec, key, foundation, decomposed)
        one = SegmentationConfig(data=dataclasses.replace(d, tasks=[spec]), evaluate=cfg.evaluate, device=cfg.device)
        task = SegDownstream(spec.name, 0, str(path), one, out / spec.name, {})
        run = task.data(0, ctx)
        if run.spatial_dims != foundation.spatial_dims:
            raise DataError(f"{key} ({path}): patches of data.segmentation.patch_size are {run.spatial_dims}D but the "
                            f"foundation model takes {foundation.spatial_dims}D inputs")
        if run.channels != foundation.channels:
            raise DataError(f"{key} ({path}): volumes have {run.channels} channel(s) but the foundation model takes "
                            f"{foundation.channels}")
        task.num_classes = run.num_classes[0]
        task.n_cases = {s: len(run.tasks[0].splits.get(s, [])) for s in ("train", "val", "test")}
        tasks.append(task)
    return tasks


# ------------------------------------------------------------------------------------- objective
class TransferObjective:
    """Single-task loss: ``task_loss`` (CE; Dice + CE for segmentation), that + soft-target KD from a
    frozen ``teacher``, or the RD loss."""

    def __init__(self, kind: str = "ce", teacher: nn.Module | None = None, cfg: TransferConfig | None = None,
                 task_loss=F.cross_entropy) -> None:
        self.kind, self.teacher, self.cfg, self.task_loss = kind, teacher, cfg, task_loss
        if teacher is not None:
            freeze(teacher)

    def __call__(self, model: nn.Module, batch: Any, global_counts: Tensor) -> StepLoss:
        if self.kind == "rd":
            r = self.cfg.rd
            total, parts = rd_loss(model(batch.images, both=True), batch.labels, r.foundation_ce_weight, r.kd_weight,
                                   r.temperature, r.cka_weight, self.task_loss)
            return StepLoss(total=total, per_task={0: float(total.detach())}, parts=parts)
        logits = model(batch.images)
        ce = self.task_loss(logits, batch.labels)
        if self.kind == "ce":
            return StepLoss(total=ce, per_task={0: float(ce.detach())}, parts={"ce": float(ce.detach())})
        k = self.cfg.kd
        with torch.no_grad():
            self.teacher.eval()
            teacher_logits = self.teacher(batch.images)
        kd = soft_target_kd(logits, teacher_logits, k.temperature)
        total = k.ce_weight * ce + k.kd_weight * kd
        return StepLoss(total=total, per_task={0: float(total.detach())},
                        parts={"ce": float(ce.detach()), "kd": float(kd.detach())})


# ---------------------------------------------------------------------------------------- run
class TransferRun:
    """Shared state of one ``lorkd transfer``: config, foundation, experts, downstream tasks."""

    def __init__(self, cfg: TransferConfig, out: Path, ctx: DistributedContext, resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg, self.out, self.ctx, self.resume, self.progress = cfg, Path(out), ctx, resume, progress
        self.foundation = f = load_transfer_foundation(cfg.foundation)
        self.dense = f.dense
        self.dense_dims = f.spatial_dims if f.dense else None
        self.metric = "dice" if f.dense else "acc"
        if f.dense and cfg.data.segmentation is None:
            raise ConfigError(f"data.tasks: {f.source} is a segmentation run; give the downstream tasks as data.segmentation")
        if not f.dense and cfg.data.segmentation is not None:
            raise ConfigError(f"data.segmentation: {f.source} is a classification run; give data.tasks (.npz files)")
        self.tasks = load_seg_downstream(cfg, f, self.out, ctx) if f.dense else load_downstream(cfg, f)
        self.experts = {name: load_expert(folder) for name, folder in self.foundation.experts.items()}
        for name, expert in self.experts.items():
            if expert.card.get("input_channels", self.foundation.channels) != self.foundation.channels:
                raise DataError(f"{self.foundation.experts[name]}: the expert takes {expert.card['input_channels']} "
                                f"channels, the foundation model {self.foundation.channels}")
        self.student_name = cfg.student or next(iter(self.experts))
        if self.student_name not in self.experts:
            raise ConfigError(f"student: {self.student_name!r} is not one of the experts {list(self.experts)}")
        self.size = cfg.data.size if cfg.data.size is not None else self.foundation.size
        if "foundation_lora" in cfg.methods and isinstance(getattr(f.backbone, "feature_root", None), torch.jit.ScriptModule):
            raise ConfigError("methods: foundation_lora adds lorkd's expert layers to the foundation's Linear/Conv "
                              "layers, which a TorchScript model does not expose; drop it or give the model as a state_dict")
        if "rd" in cfg.methods:  # fail before any training, not when rd's turn comes
            for i, (student_layer, foundation_layer) in enumerate(cfg.rd.pairs):
                find_layer(self.experts[self.student_name].backbone, student_layer, f"rd.pairs[{i}][0] (student layer)")
                find_layer(getattr(f.backbone, "feature_root", f.backbone), foundation_layer,
                           f"rd.pairs[{i}][1] (foundation layer)")

    def recipe(self, task: Any, seed: int) -> "TransferRecipe":
        """The recipe of one downstream task and seed: its data, scoring and method training."""
        return TransferRecipe(self, task, seed)

    # ---- methods
    def jobs(self) -> list[tuple[str, str | None]]:
        """``(method, expert or None)`` in training order; ``kd`` needs ``foundation_lp`` first."""
        wanted = set(self.cfg.methods) | ({"foundation_lp"} if "kd" in self.cfg.methods else set())
        out = []
        for method in METHODS:
            if method in wanted:
                out += [(method, e) for e in self.experts] if method in EXPERT_METHODS else [(method, None)]
        return out

    def expert_parts(self, name: str) -> tuple[nn.Module, dict[str, Any], int]:
        """A fresh copy of expert ``name``'s backbone, its spec and feature width."""
        expert = self.experts[name]
        kwargs = expert.card["architecture"]["kwargs"]
        return copy.deepcopy(expert.backbone), kwargs["backbone"], int(kwargs["feature_dim"])

    def build(self, method: str, expert: str | None, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
        """The model of ``method`` and the spec of its exported plain form."""
        f = self.foundation
        if method in ("foundation_ft", "foundation_lp", "foundation_lora"):
            backbone = copy.deepcopy(f.backbone)
            if method == "foundation_lora":
                backbone = add_experts(backbone, 1, rank=self.cfg.lora.rank, alpha=self.cfg.lora.alpha, norm="shared")
                backbone.requires_grad_(False)
                for p in backbone.task_parameters():
                    p.requires_grad_(True)
            elif method == "foundation_lp":
                freeze(backbone)
            model = Classifier(backbone, self.head(f.feature_dim, num_classes), frozen=method != "foundation_ft")
            if f.example is not None and method != "foundation_lp":  # a source model: layers after `features` stay
                train_only_used(model, f.example)
            return model, plain_spec(f.backbone_spec, f.feature_dim, num_classes, self.dense_dims)
        if method in EXPERT_METHODS:
            backbone, spec, dim = self.expert_parts(expert)
            if method == "expert_lp":
                freeze(backbone)
            return (Classifier(backbone, self.head(dim, num_classes), frozen=method == "expert_lp"),
                    plain_spec(spec, dim, num_classes, self.dense_dims))
        backbone, spec, dim = self.expert_parts(self.student_name)
        if method == "scratch" or self.cfg.student_init == "random":
            backbone = build_architecture(spec)
        if method == "rd":
            r = self.cfg.rd
            model = ReprogrammingDistiller(f.backbone, f.feature_dim, backbone, dim, num_classes, f.channels,
                                           f.spatial_dims, r.input, r.feature, r.input_hidden, r.feature_hidden, r.pairs,
                                           dense=self.dense)
            return model, plain_spec(spec, dim, num_classes, self.dense_dims)
        return Classifier(backbone, self.head(dim, num_classes)), plain_spec(spec, dim, num_classes, self.dense_dims)

    def head(self, dim: int, num_classes: int) -> nn.Module:
        """A new task head: ``Linear(dim, K)``, or a 1x1 convolution for segmentation."""
        return pointwise(dim, num_classes, self.dense_dims)

    def folder(self, task: str, method: str, expert: str | None, seed: int) -> Path:
        return self.out / task / f"seed{seed}" / (method if expert is None else f"{method}-{expert}")


class TransferRecipe(Recipe):
    """One downstream task and seed of ``lorkd transfer`` on the recipe protocol: the data (for
    segmentation, a :class:`~lorkd.pipelines.recipes.segmentation.SegmentationRecipe` of the task
    holds it: patches for train, whole volumes for val and test), scoring (accuracy and AUC, or
    mean foreground Dice) and :meth:`train_method`, which trains a method with :meth:`Recipe.fit`."""

    kind = "transfer"

    def __init__(self, setup: TransferRun, task: Any, seed: int) -> None:
        super().__init__(setup.cfg, setup.out, setup.ctx, setup.resume, setup.progress, seed=seed)
        self.setup, self.task = setup, task
        self.select_metric = setup.metric
        self.val_keys = (setup.metric,)
        self.task_loss = dice_ce_loss if setup.dense else F.cross_entropy
        self.tasks, self.names, self.num_classes = [task], [task.name], [task.num_classes]
        f = setup.foundation
        self.channels, self.spatial_dims = f.channels, f.spatial_dims
        self.seg: SegmentationRecipe | None = task.data(seed, self.ctx) if setup.dense else None
        if self.seg is not None:
            self.train_set, self.val_set, self.test_set = self.seg.train_set, self.seg.val_set, self.seg.test_set
        else:
            self.train_set, self.val_set, self.test_set = (
                MultiTaskDataset([task], split, size=setup.size, channels=f.channels, mean=f.mean, std=f.std, seed=seed,
                                 augment=split == "train" and self.cfg.data.augment) for split in ("train", "val", "test"))

    # ---- data
    def train_data(self, tasks: list[int] | None = None) -> Any:
        return self.train_set

    def dataset(self, split: str, tasks: list[int] | None = None) -> Any:
        return {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]

    def task_counts(self, t: int) -> dict[str, int]:
        return {s: len(self.dataset(s)) for s in ("train", "val", "test")}

    # ---- scoring
    def result(self, model: nn.Module, split: str, keep_items: bool = False) -> dict[str, Any]:
        """The metric of ``model`` on ``split`` (+ ``per_item`` for the bootstrap)."""
        if self.seg is not None:
            return seg_scores(model, self.dataset(split), self.seg, keep_items)
        return scores(model, self.dataset(split), self.ctx.device, keep_items)

    def score(self, model: nn.Module, data: Any, tasks: list[int] | None = None,
              keep: dict[int, dict[str, np.ndarray]] | None = None, final: bool = False) -> dict[int, dict[str, float]]:
        split = "test" if data is self.test_set else "val"
        return {0: self.result(model, split, keep_items=keep is not None)}

    def val_metrics(self, model: nn.Module, tasks: list[int] | None = None) -> dict[str, float]:
        """The validation metrics that select a method's epoch: ``{"acc", "auc"}`` or ``{"dice"}``."""
        return self.result(model, "val")

    # ---- methods
    def card(self, label: str) -> dict[str, Any]:
        """What ``lorkd predict`` needs to run an exported model (as the recipes' expert cards)."""
        f, task = self.setup.foundation, self.task
        if self.seg is not None:
            return {**expert_card(self.seg, 0), "method": label, "seed": self.seed, "foundation": f.source}
        return {"task": task.name, "classes": task.num_classes, "input_channels": f.channels,
                "input_size": self.setup.size or list(task.image_size), "spatial_dims": f.spatial_dims,
                "normalisation": {"mean": f.mean, "std": f.std, "scale": "x / 255"}, "method": label, "seed": self.seed,
                "foundation": f.source}

    def train_method(self, method: str, expert: str | None,
                     lp_model: nn.Module | None) -> tuple[dict[str, Any], nn.Module]:
        """Train (or reuse) one method on this task and seed; returns its result and the trained model."""
        task, seed = self.task, self.seed
        label = method if expert is None else f"{method}:{expert}"
        folder = self.setup.folder(task.name, method, expert, seed)
        torch.manual_seed(seed)
        model, spec = self.setup.build(method, expert, task.num_classes)
        if (folder / "result.json").is_file():
            result = read_json(folder / "result.json")
            if method == "foundation_lp":  # kd's teacher: the frozen foundation + the saved head
                model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
            return result, model.to(self.ctx.device)
        if method == "kd" and lp_model is None:
            raise ConfigError("kd needs the foundation_lp model, which was not trained")
        objective = TransferObjective("rd" if method == "rd" else "kd" if method == "kd" else "ce",
                                      teacher=copy.deepcopy(lp_model) if method == "kd" else None, cfg=self.cfg,
                                      task_loss=self.task_loss)
        if objective.teacher is not None:
            objective.teacher.to(self.ctx.device)
        start = time.perf_counter()
        model = self.fit(model, self.cfg.train, folder, objective)
        seconds = time.perf_counter() - start
        model.eval()
        deployed = model.export()
        result = {"task": task.name, "method": method, "expert": expert, "label": label, "seed": seed,
                  "val": self.result(model, "val"), "test": self.result(model, "test", keep_items=True),
                  "trained_params": M.count_parameters(model, trainable_only=True),
                  "deployed_params": M.count_parameters(deployed), "seconds": round(seconds, 3),
                  "best_epoch": _best_epoch(folder)}
        if self.ctx.is_main:
            self._save(method, model, deployed, spec, folder, label)
            write_json(folder / "result.json", result)
            if not self.cfg.keep_checkpoints:
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return result, model

    def _save(self, method: str, model: nn.Module, deployed: nn.Module, spec: dict[str, Any] | None, folder: Path,
              label: str) -> None:
        """``foundation_lp``: only its head; others: the deployed plain model (+ ``rd``'s reprogramming parts)."""
        if method == "foundation_lp":
            save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(folder / "head.safetensors"))
        else:
            save_expert(deployed.cpu(), folder / "model", architecture=spec, card=self.card(label))
        if method == "rd":
            parts = model.trainable_modules().state_dict()
            save_file({k: v.contiguous() for k, v in parts.items()}, str(folder / "reprogram.safetensors"))


def _best_epoch(folder: Path) -> int | None:
    path = folder / "checkpoints" / "best.pt"
    if not path.is_file():
        return None
    return int(load_checkpoint(path)["epoch"])


@torch.no_grad()
def scores(model: nn.Module, dataset: MultiTaskDataset, device: torch.device, keep_items: bool = False) -> dict[str, Any]:
    """``{"acc", "auc"}`` of a single-task classifier on ``dataset`` (+ ``per_item``: 0/1 per image)."""
    probs, labels = predict_probs(model, dataset, device, [0])[0]
    out: dict[str, Any] = {"acc": M.accuracy(probs, labels), "auc": M.roc_auc(probs, labels)}
    if keep_items:
        out["per_item"] = (probs.argmax(1) == labels).astype(int).tolist()
    return out


@torch.no_grad()
def seg_scores(model: nn.Module, dataset: Any, seg_run: SegmentationRecipe, keep_items: bool = False) -> dict[str, Any]:
    """``{"dice"}`` of a single-task segmenter on whole volumes (sliding windows, as the recipe):
    the mean over foreground classes of each class's mean Dice over the cases where it is present
    in prediction or label (+ ``per_item``: the ``[cases, K - 1]`` Dice, NaN where absent)."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i in range(len(dataset)):
            image, label, t, _, _ = dataset[i]
            pred = predict_case(model, image, t, seg_run)
            rows.append(M.dice_per_class(pred, label.numpy(), dataset.tasks[t].num_classes, absent=math.nan))
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"dice": item_statistic(np.stack(rows))}
    if keep_items:
        out["per_item"] = np.stack(rows).tolist()
    return out


def summarise(run: TransferRun, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``metrics.json`` of a transfer run from the per-(task, method, seed) results."""
    cfg, f, key = run.cfg, run.foundation, run.metric
    methods: dict[str, dict[str, Any]] = {}
    for task in run.tasks:
        rows = [r for r in results if r["task"] == task.name]
        table = {}
        for label in dict.fromkeys(r["label"] for r in rows):
            runs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
            values = np.array([r["test"][key] for r in runs])
            lo, hi = bootstrap_interval([r["test"]["per_item"] for r in runs], cfg.bootstrap)
            table[label] = {
                "method": runs[0]["method"], "expert": runs[0]["expert"], "n_seeds": len(runs),
                "test_mean": float(values.mean()), "test_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "test_ci95": [lo, hi], "val_mean": float(np.mean([r["val"][key] for r in runs])),
                "trained_params": runs[0]["trained_params"], "deployed_params": runs[0]["deployed_params"],
                "seconds_mean": float(np.mean([r["seconds"] for r in runs])),
                "seeds": {str(r["seed"]): {k: v for k, v in r.items() if k not in ("test",)}
                          | {"test": {k: v for k, v in r["test"].items() if k != "per_item"}} for r in runs},
            }
            if key == "acc":
                table[label]["test_auc_mean"] = float(np.mean([r["test"]["auc"] for r in runs]))
        methods[task.name] = table
    data = []
    for task in run.tasks:
        if run.dense:
            data.append({"name": task.name, "source": task.source, "num_classes": task.num_classes,
                         "spatial_dims": f.spatial_dims, **{f"n_{s}": n for s, n in task.n_cases.items()}})
            continue
        counts = task.class_counts("test")
        data.append({"name": task.name, "source": task.source, "num_classes": task.num_classes, "channels": task.channels,
                     "spatial_dims": task.spatial_dims, "n_train": task.num_samples("train"),
                     "n_val": task.num_samples("val"), "n_test": task.num_samples("test"),
                     "test_majority_rate": float(counts.max() / counts.sum())})
    return {
        "task_kind": "segmentation" if run.dense else "classification", "primary_metric": key, "split": "test",
        "kind": "transfer",
        "foundation": {"source": f.source, "tasks": f.tasks, "backbone": f.backbone_spec,
                       "params": M.count_parameters(f.backbone), "experts": list(f.experts), "student": run.student_name},
        "data": data, "max_train": cfg.data.max_train, "seeds": list(cfg.seeds),
        "budget": {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "optim": cfg.train.optim.name,
                   "lr": cfg.train.optim.lr},
        "bootstrap": {"resamples": cfg.bootstrap, "method": BOOTSTRAP_NOTE},
        "methods": methods,
    }


def run_transfer(cfg: TransferConfig, out: Path, ctx: DistributedContext, resume: bool = False,
                 progress: bool = True) -> dict[str, Any] | None:
    """Train and evaluate every method on every downstream task and seed; write ``metrics.json``,
    ``report.md`` and the plots (rank 0). Returns the metrics on rank 0, else ``None``."""
    run = TransferRun(cfg, out, ctx, resume=resume, progress=progress)  # checks everything before training
    if ctx.is_main:
        log.info(transfer_startup_summary(run))
        write_config(out / "config.yaml", cfg)
    results = []
    for task in run.tasks:
        for seed in cfg.seeds:
            recipe = run.recipe(task, seed)
            lp_model = None
            for method, expert in run.jobs():
                log.info("transfer: %s / %s%s / seed %d", task.name, method, f" ({expert})" if expert else "", seed)
                result, model = recipe.train_method(method, expert, lp_model)
                if method == "foundation_lp":
                    lp_model = model
                results.append(result)
    if not ctx.is_main:
        return None
    metrics = summarise(run, results)
    metrics["config"] = to_dict(cfg)
    write_json(out / "metrics.json", metrics)
    write_transfer_report(out, metrics)
    for task, warned in majority_warnings(metrics).items():
        for w in warned:
            log.warning("transfer: %s: %s", task, w.replace("**Warning:** ", ""))
    return metrics
