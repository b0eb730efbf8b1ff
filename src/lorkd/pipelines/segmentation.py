"""The segmentation recipe: teacher -> decompose -> baselines -> export -> evaluate -> report.

The same stages as the classification recipe (:mod:`lorkd.pipelines.common` holds them): only
the data (random patches for training, whole preprocessed volumes for validation and test), the
network (:class:`~lorkd.models.segmenter.MultiTaskSegmenter`), the task loss (Dice + CE) and the
evaluation (sliding-window inference, Dice and HD95 per class) are this module's own.

* Cases are split by patient; the split of task ``t`` is written to ``out/split_<t>.json`` and
  read back by every later stage (and by a resumed run), so all stages see the same cases.
* Training patches come from :class:`~lorkd.data.segmentation.PatchDataset` with
  ``task_blocks=True`` (each task owns a contiguous block of indices, sized equally or by the
  number of patches), which :class:`~lorkd.data.multitask.TaskBatchSampler` shuffles into
  task-mixing batches.
* Model selection: mean foreground Dice over the tasks on whole validation volumes.
* Metrics are computed on each case's original grid: the logits are resampled back from the
  preprocessed grid to the original shape, and compared with the label as read; HD95 is in mm of
  the file's spacing (HDF5 without spacing: 1 mm per voxel). Missed / spurious structures are
  counted per class and get an HD95 penalty (see :func:`evaluate_network`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.paths import locate
from ..data.segmentation import (
    CANONICAL_ORIENTATION,
    PatchDataset,
    SegmentationTaskData,
    VolumeCache,
    VolumeDataset,
    load_segmentation_task,
    probe_spacing,
    resample,
)
from ..distill import dice_ce_loss
from ..engine import metrics as M
from ..engine.distributed import DistributedContext
from ..engine.inference import sliding_window_logits
from ..errors import ConfigError, DataError
from ..experts import load_expert, save_expert
from ..models.multitask import MultiTaskNet
from ..models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
from ..report.stats import run_statistics, save_predictions
from .common import baseline_parameters, drive, fit_stage
from .schema import Stage
from .segmentation_schema import SegmentationConfig

log = logging.getLogger("lorkd")

STAGES = ("teacher", "student", "baselines", "export", "evaluate")


# ---------------------------------------------------------------------------------------- data
def load_tasks(cfg: SegmentationConfig, out: Path | None = None, write: bool = True) -> list[SegmentationTaskData]:
    """Scan every task of the config and split it by patient.

    With ``out``, an existing ``out/split_<task>.json`` is reused (so every stage and a resumed
    run see the same cases) and a new split is written there (when ``write``). The split file
    holds every case; ``data.max_train`` then keeps a random subset of the training cases (seed
    ``data.cap_seed``, in split order), the same for every model.
    """
    tasks = []
    for i, spec in enumerate(cfg.data.tasks):
        saved = Path(out) / f"split_{spec.name}.json" if out is not None else None
        split: Any = spec.split if spec.split is not None else list(cfg.data.split)
        if saved is not None and saved.is_file():
            split = str(saved)
        locate(spec.path, f"data.tasks[{i}].path")  # a missing folder: the places searched
        try:
            task = load_segmentation_task(spec.name, spec.path, format=spec.format, num_classes=spec.num_classes,
                                          split=split, seed=cfg.data.seed, **spec.reader)
        except DataError as err:
            raise DataError(f"data.tasks[{i}] ({spec.name}): {err}") from err
        for name in ("train", "val", "test"):
            if not task.splits.get(name):
                raise ConfigError(f"data.tasks[{spec.name}]: split {name!r} holds no case "
                                  f"({sum(len(v) for v in task.splits.values())} cases in all); add cases or change data.split")
        if saved is not None and write and not saved.is_file():
            task.save_split(saved)
        train, cap = task.splits["train"], cfg.data.max_train
        if cap is not None and cap < len(train):
            keep = np.sort(np.random.default_rng(cfg.data.cap_seed).choice(len(train), cap, replace=False))
            task.splits["train"] = [train[k] for k in keep]
        tasks.append(task)
    return tasks


def data_summary(tasks: list[SegmentationTaskData]) -> list[dict[str, Any]]:
    return [{"name": t.name, "source": t.root, "num_classes": t.num_classes, "channels": t.in_channels,
             "spatial_dims": t.spatial_dims, **{f"n_{s}": len(t.splits.get(s, [])) for s in ("train", "val", "test")}}
            for t in tasks]


# ---------------------------------------------------------------------------------------- run
class Run:
    """Shared state of one run: config, tasks, datasets, device, output folder, and the hooks the
    shared stages of :mod:`lorkd.pipelines.common` call."""

    task_loss = staticmethod(dice_ce_loss)
    select_metric = "dice"  # the key of val_metrics that selects models

    def __init__(self, cfg: SegmentationConfig, out: Path, ctx: DistributedContext, resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg, self.out, self.ctx, self.resume, self.progress = cfg, Path(out), ctx, resume, progress
        self.tasks = load_tasks(cfg, self.out, write=ctx.is_main)
        self.names = [t.name for t in self.tasks]
        self.num_classes = [t.num_classes for t in self.tasks]
        self.patch = tuple(cfg.data.patch_size)
        self.spatial_dims = len(self.patch)
        for t in self.tasks:
            if t.spatial_dims not in (self.spatial_dims, self.spatial_dims + 1):
                raise ConfigError(f"data.patch_size {list(self.patch)} does not fit task {t.name!r} "
                                  f"({t.spatial_dims} spatial dims)")
        self.channels = max(t.in_channels for t in self.tasks)
        self.preprocess = [(spec.preprocess or cfg.data.preprocess) for spec in cfg.data.tasks]
        self._pre = [p.build() for p in self.preprocess]
        self.roi = tuple(cfg.evaluate.roi_size or self.patch)
        self.cache = VolumeCache()
        self.train_set = self.patches(None)
        self.val_set = self.dataset("val")
        self.test_set = self.dataset("test")
        self.timing: dict[str, float] = {}

    # ---- data
    def patches(self, tasks: list[int] | None) -> PatchDataset:
        """Training patches of all tasks, or of ``tasks`` only (then with that share of
        ``samples_per_epoch``, so a single-task model sees as many of its task's patches)."""
        d = self.cfg.data
        ids = list(range(len(self.tasks))) if tasks is None else list(tasks)
        n = max(len(ids), math.ceil(d.samples_per_epoch * len(ids) / len(self.tasks)))
        return PatchDataset([self.tasks[t] for t in ids], self.patch, "train", n, d.foreground_ratio,
                            [self._pre[t] for t in ids], in_channels=self.channels, channel_fill=d.channel_fill,
                            seed=self.cfg.seed, cache=self.cache, task_blocks=True, augment=d.augment.build())

    def dataset(self, split: str, tasks: list[int] | None = None) -> VolumeDataset:
        """Whole preprocessed volumes of ``split``; of ``tasks`` only if given (task ids then index that list)."""
        ids = list(range(len(self.tasks))) if tasks is None else list(tasks)
        return VolumeDataset([self.tasks[t] for t in ids], split, [self._pre[t] for t in ids],
                             in_channels=self.channels, channel_fill=self.cfg.data.channel_fill, cache=self.cache)

    # ---- hooks of the shared stages
    def spec(self, net) -> dict[str, Any]:
        return segmentation_backbone_spec(net.arch, self.spatial_dims, self.channels, net.channels, net.features,
                                          net.norm, net.num_res_units, net.kwargs)

    def network(self, net, num_classes: list[int], experts: dict[str, Any] | None = None) -> MultiTaskSegmenter:
        torch.manual_seed(self.cfg.seed)
        return MultiTaskSegmenter(self.spec(net), num_classes, experts)

    @staticmethod
    def build(meta: dict[str, Any]) -> MultiTaskSegmenter:
        return MultiTaskSegmenter(meta["backbone"], meta["num_classes"], meta.get("experts"))

    def meta(self, model: MultiTaskSegmenter, kind: str, tasks: list[int] | None = None, **extra: Any) -> dict[str, Any]:
        tasks = tasks if tasks is not None else list(range(len(self.tasks)))
        return {"kind": kind, "task_kind": "segmentation", "backbone": model.backbone_spec,
                "num_classes": model.num_classes, "tasks": [self.names[t] for t in tasks], "channels": self.channels,
                "patch_size": list(self.patch), **extra}

    def fit(self, model: nn.Module, stage: Stage, folder: Path, objective, task_subset: list[int] | None = None,
            extra: nn.Module | None = None, train_set: Any = None) -> nn.Module:
        """Train on ``train_set`` (default: random patches, of ``task_subset`` only if given); select
        on validation Dice."""
        ids = list(range(len(self.tasks))) if task_subset is None else list(task_subset)
        train = train_set if train_set is not None else self.train_set if task_subset is None else self.patches(task_subset)
        return fit_stage(model, objective, train, stage, folder, self.ctx, seed=self.cfg.seed,
                         num_workers=self.cfg.num_workers, progress=self.progress, resume=self.resume,
                         evaluate=lambda m: self.val_metrics(m, task_subset), select_metric=self.select_metric,
                         task_names=[self.names[t] for t in ids], sampler_mode=self.cfg.data.sampler, extra=extra,
                         tensorboard=self.cfg.logging.tensorboard)

    def val_metrics(self, model: nn.Module, tasks: list[int] | None = None) -> dict[str, float]:
        """Mean foreground Dice on whole validation volumes, over ``tasks`` (key ``dice``) and per task."""
        data = self.val_set if tasks is None else self.dataset("val", tasks)
        per_task = evaluate_network(model, data, self, hd95=False)
        names = self.names if tasks is None else [self.names[t] for t in tasks]
        out = {"dice": _nanmean([m["dice"] for m in per_task.values()])}
        out.update({f"dice_{names[t]}": m["dice"] for t, m in per_task.items()})
        return out


# ---------------------------------------------------------------------------------------- evaluation
def predictor_for(model: nn.Module, task: int):
    """``[n, C, *roi] -> [n, K_task, *roi]`` logits of ``task``: a multi-task network is called with
    task ids, a plain (exported) one directly."""
    if isinstance(model, MultiTaskNet):
        return lambda x: model(x, torch.full((x.shape[0],), task, dtype=torch.long, device=x.device)).logits[task]
    return model


@torch.no_grad()
def predict_case(model: nn.Module, image: torch.Tensor, task: int, run: Run,
                 size: tuple[int, ...] | None = None) -> np.ndarray:
    """Label map of one preprocessed image ``[C, *spatial]``: the argmax of the sliding-window
    logits, on the preprocessed grid ``[*spatial]``, or with ``size`` on that grid (the case's
    original shape: the logits are resampled back with :func:`~lorkd.data.segmentation.resample`,
    the inverse of the preprocessing's grid change, before the argmax)."""
    ev = run.cfg.evaluate
    logits = sliding_window_logits(predictor_for(model, task), image, run.roi, ev.overlap, ev.sw_batch_size,
                                   ev.mode, run.ctx.device)
    if size is not None:
        logits = resample(logits, size)
    return logits.argmax(0).numpy()


def evaluate_network(model: nn.Module, dataset: VolumeDataset, run: Run, tasks: list[int] | None = None,
                     hd95: bool = False, keep: dict[int, dict[str, np.ndarray]] | None = None
                     ) -> dict[int, dict[str, float]]:
    """``{task: {"dice", "dice_<c>"..., ["hd95", "hd95_<c>"...], "missed", "spurious", "missed_<c>",
    "spurious_<c>", "cases"}}`` of ``model`` on whole volumes, on each case's original grid.

    Predictions are resampled back to the case's original shape (``meta["original_shape"]``) and
    compared with the label as read from the file; HD95 uses the file's spacing
    (``meta["original_spacing"]``: NIfTI header, HDF5 ``spacing``, else 1 mm), so it is in mm.
    ``missed_<c>`` / ``spurious_<c>`` count the cases where class ``c`` is in the label but not
    predicted / predicted but not in the label (``missed``, ``spurious``: summed over classes);
    such a case gets Dice 0 and the HD95 penalty of :func:`~lorkd.engine.metrics.hd95_per_class`
    (the image diagonal in mm), so it is counted, never dropped. A class absent from both counts
    Dice 1 and is left out of that case's HD95. Per class: the mean over the task's ``cases``;
    ``dice``/``hd95``: the mean over the foreground classes. ``model`` is a multi-task network
    (any task) or a plain one (``tasks`` = its one task). With ``keep``, also
    ``keep[task] = {"dice": [n_cases, C-1]}`` (per-case Dice, for the bootstrap)."""
    was_training = model.training
    model.eval()
    scores: dict[int, dict[str, list[np.ndarray]]] = {}
    try:
        for i in range(len(dataset)):
            t = dataset.items[i][0]
            if tasks is not None and t not in tasks:
                continue
            image, _, t, _, meta = dataset[i]
            pred = predict_case(model, image, t, run, tuple(meta["original_shape"]))
            label = dataset.original_label(i)
            k = dataset.tasks[t].num_classes
            entry = scores.setdefault(t, {"dice": [], "hd95": [], "missed": [], "spurious": []})
            entry["dice"].append(M.dice_per_class(pred, label, k))
            missed, spurious = M.structure_errors(pred, label, k)
            entry["missed"].append(missed)
            entry["spurious"].append(spurious)
            if hd95:
                entry["hd95"].append(M.hd95_per_class(pred, label, k, spacing=meta["original_spacing"]))
    finally:
        model.train(was_training)
    result = {}
    for t, entry in scores.items():
        if keep is not None:
            keep[t] = {"dice": np.stack(entry["dice"])}
        out: dict[str, float] = {}
        for key in ("dice", "hd95"):
            if entry[key]:
                per_class = _nanmean_rows(np.stack(entry[key]))
                out[key] = _nanmean(per_class)
                out.update({f"{key}_{c + 1}": float(v) for c, v in enumerate(per_class)})
        for key in ("missed", "spurious"):
            per_class = np.stack(entry[key]).sum(0)
            out[key] = int(per_class.sum())
            out.update({f"{key}_{c + 1}": int(v) for c, v in enumerate(per_class)})
        out["cases"] = len(entry["dice"])
        result[t] = out
    return result


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(a)
    counts = ok.sum(0)
    return np.where(counts > 0, np.where(ok, a, 0.0).sum(0) / np.maximum(counts, 1), np.nan)


def _nanmean(values) -> float:
    a = np.asarray(list(values), dtype=np.float64)
    return float(a[~np.isnan(a)].mean()) if (~np.isnan(a)).any() else math.nan


# ---------------------------------------------------------------------------------------- stages
def expert_card(run: Run, t: int) -> dict[str, Any]:
    """What ``lorkd predict`` needs to run the expert of task ``t`` on a new image or volume."""
    pre = run.preprocess[t]
    task = run.tasks[t]
    return {"task": run.names[t], "task_id": t, "task_kind": "segmentation", "classes": run.num_classes[t],
            "in_channels": run.channels, "input_channels": run.channels, "task_channels": task.in_channels,
            "channel_fill": run.cfg.data.channel_fill,
            "spatial_dims": run.spatial_dims, "data_spatial_dims": task.spatial_dims,
            "slice_mode": task.spatial_dims == run.spatial_dims + 1, "patch_size": list(run.patch),
            "inference": {"roi_size": list(run.roi), "overlap": run.cfg.evaluate.overlap,
                          "sw_batch_size": run.cfg.evaluate.sw_batch_size, "mode": run.cfg.evaluate.mode},
            "preprocessing": {"normalize": pre.normalize, "scale": pre.scale, "target_spacing": pre.target_spacing,
                              "target_shape": pre.target_shape},
            **_geometry_card(run, t),
            "rebuild_without_lorkd": "nn.Sequential(OrderedDict(backbone=<architecture.kwargs.backbone.factory>"
                                     "(**kwargs), head=ConvNd(feature_dim, num_classes, kernel_size=1)))"}


def _geometry_card(run: Run, t: int) -> dict[str, Any]:
    """Card keys that say how the training volumes were laid out, so ``predict`` handles a new
    volume the same way:

    * ``orientation``: ``"SPL"`` (:data:`~lorkd.data.volumes.CANONICAL_ORIENTATION`) when the task
      is NIfTI (every 3D NIfTI is reoriented to it on read: reorient an input with
      :func:`lorkd.data.volumes.reorient` before inference and the mask back to the file's own
      codes after); ``null``: arrays in the file's own axis order (HDF5, 2D images).
    * ``axis_order``: names of the data axes in that order (``["S", "P", "L"]`` for NIfTI, else
      ``["axis0", "axis1", ...]`` of the file).
    * ``slice_axis``: for a 2D network on 3D data (``slice_mode``) the data axis it is applied
      slice by slice along (0, the first axis of ``axis_order``); ``null`` otherwise.
    * ``spacing``: median voxel size (mm) per data axis over the training cases, as read (NIfTI
      header; HDF5 ``reader.spacing`` or ``spacing`` attribute, else 1.0), before preprocessing."""
    task = run.tasks[t]
    refs = task.cases("train")
    oriented = task.spatial_dims == 3 and any(getattr(r, "kind", None) == "nifti" for r in refs)
    spacings = np.array([probe_spacing(r) for r in refs], dtype=np.float64)
    return {"orientation": CANONICAL_ORIENTATION if oriented else None,
            "axis_order": list(CANONICAL_ORIENTATION) if oriented else [f"axis{i}" for i in range(task.spatial_dims)],
            "slice_axis": 0 if task.spatial_dims == run.spatial_dims + 1 else None,
            "spacing": [float(v) for v in np.median(spacings, axis=0)]}


def stage_export(run: Run, student: MultiTaskSegmenter) -> dict[str, Path]:
    """Write one plain expert per task to ``experts/<task>/`` (safetensors + card.json, and the
    ``export`` formats: ONNX with dynamic batch and spatial axes, TorchScript, each checked against PyTorch)."""
    from .export_formats import write_formats

    folders = {}
    ex = run.cfg.export
    for t, name in enumerate(run.names):
        expert, spec = student.export_task(t)
        card = expert_card(run, t)
        card["files"] = write_formats(expert, run.out / "experts" / name, (run.channels, *run.patch), onnx=ex.onnx,
                                      torchscript=ex.torchscript, opset=ex.opset, dynamic_spatial=True)
        folders[name] = save_expert(expert, run.out / "experts" / name, architecture=spec, card=card)
    return folders


def stage_evaluate(run: Run, teacher: MultiTaskSegmenter, student: MultiTaskSegmenter,
                   baselines: dict[str, Any]) -> dict[str, Any]:
    """Dice (+ HD95 on test) of every model on val and test, sizes, FLOPs and latency per patch."""
    dev = run.ctx.device
    use_hd = run.cfg.evaluate.hd95
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    outputs: dict[str, dict[str, dict[str, np.ndarray]]] = {name: {} for name in run.names}  # test, per case
    for split, dataset in (("val", run.val_set), ("test", run.test_set)):
        hd = use_hd and split == "test"
        table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in run.names}

        def score(label: str, model: nn.Module, data: VolumeDataset, tasks: list[int] | None = None,
                  names: list[str] = run.names) -> None:
            kept: dict[int, dict[str, np.ndarray]] = {}
            for t, m in evaluate_network(model, data, run, tasks, hd95=hd, keep=kept).items():
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
    example = torch.zeros(1, run.channels, *run.patch)
    teacher_plain = teacher.export_task(0)[0].cpu().eval()
    expert_plain = load_expert(run.out / "experts" / run.names[0]).cpu().eval()
    reps = run.cfg.evaluate.latency_repeats
    keys = ["dice", "hd95"] if use_hd else ["dice"]
    params = {"teacher": M.count_parameters(teacher), "teacher_backbone_and_one_head": M.count_parameters(teacher_plain),
              "student": M.count_parameters(student), "expert": M.count_parameters(expert_plain),
              **baseline_parameters(baselines)}
    return {
        "task_kind": "segmentation", "metric_keys": keys, "primary_metric": "dice",
        "split": "test", "tasks": results["test"], "val": results["val"],
        "params": params,
        "flops": {"teacher": M.count_flops(teacher_plain, example), "expert": M.count_flops(expert_plain, example)},
        "latency_ms": {"teacher": M.cpu_latency_ms(teacher_plain, example, reps),
                       "expert": M.cpu_latency_ms(expert_plain, example, reps)},
        "latency_batch": 1, "latency_input": f"one patch {list(run.patch)}",
        "data": data_summary(run.tasks),
        "models": MODEL_DESCRIPTIONS,
        "statistics": run_statistics(outputs, keys, "dice", results["val"], list(baselines)),
        "notes": ["Dice and HD95 on whole volumes on each case's original grid (sliding-window inference on the "
                  "preprocessed grid, logits resampled back to the original shape); per-class keys dice_<c>/hd95_<c> "
                  "are foreground classes 1..C-1; HD95 in mm from the file's voxel spacing (NIfTI header; HDF5: "
                  "reader.spacing or a 'spacing' attribute, else 1 mm per voxel).",
                  "A structure missed (in the label, not predicted) or spurious (predicted, not in the label) counts "
                  "Dice 0 and HD95 = the image diagonal in mm (a penalty, never dropped); missed/spurious count those "
                  "cases (of 'cases'); a class absent from both counts Dice 1 and is left out of HD95."],
    }


MODEL_DESCRIPTIONS = {
    "teacher": "foundation segmentation network trained on all tasks (shared body, one 1x1 conv head per task)",
    "student": "LoRKD student: small segmentation body + one low-rank expert per task, routed by task id",
    "expert": "the exported plain expert of the task (student with its expert merged, + its head)",
    "stl": "student network trained on the task alone",
    "stl_kd": "student network trained on the task alone, with the teacher's distillation",
    "mtl": "student network, shared body, one head per task, no experts",
    "mtl_kd": "MTL with the teacher's distillation",
    "student_nokd": "LoRKD student without distillation (kd_weight = feat_weight = 0, no feature pairs)",
}


# ---------------------------------------------------------------------------------------- driver
def run_stages(cfg: SegmentationConfig, out: Path, ctx: DistributedContext, stages: tuple[str, ...] = STAGES,
               resume: bool = False, progress: bool = True, reuse: bool = False) -> dict[str, Any] | None:
    """Run ``stages`` in order; earlier stages' outputs are reused when present (when their
    fingerprint matches the config, or with ``reuse``: see :func:`~lorkd.pipelines.common.drive`).

    Returns the metrics when ``evaluate`` ran (on rank 0), else ``None``.
    """
    run = Run(cfg, out, ctx, resume=resume, progress=progress)  # scans the data and writes the splits first
    return drive(run, stages, stage_export, stage_evaluate, reuse=reuse)
