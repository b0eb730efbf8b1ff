"""The segmentation recipe on the protocol of :class:`~lorkd.pipelines.core.recipe.DecompositionRecipe`.

The same stages as the classification recipe (:mod:`lorkd.pipelines.stages`): only the data (random patches for training, whole preprocessed volumes for validation and test), the
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
  counted per class and get an HD95 penalty (see :func:`score_volumes`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ...data.paths import locate
from ...data.segmentation import (
    CANONICAL_ORIENTATION,
    NORMALIZE_DETAILS,
    PatchDataset,
    SegmentationTaskData,
    VolumeCache,
    VolumeDataset,
    load_segmentation_task,
    probe_spacing,
    resample,
)
from ...distill import dice_ce_loss
from ...engine import metrics as M
from ...engine.distributed import DistributedContext
from ...engine.inference import sliding_window_logits
from ...errors import ConfigError, DataError
from ...experts import load_expert
from ...fileio import write_json
from ...models.multitask import MultiTaskNet
from ...models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec
from ..core.objective import TaskRemap
from ..core.recipe import DecompositionRecipe
from ..core.scoring import ROUTED_STUDENT
from ..schema import SegmentationConfig
from ..schema.segmentation import SegNet
from . import segmentation_routing as SR

log = logging.getLogger("lorkd")

# ---------------------------------------------------------------------------------------- data
def load_volume_tasks(cfg: SegmentationConfig, out: Path | None = None, write: bool = True) -> list[SegmentationTaskData]:
    """Scan every task of the config and split it by patient.

    With ``out``, an existing ``out/split_<task>.json`` is reused (so every stage and a resumed
    run see the same cases) and a new split is written there (when ``write``). The split file
    holds every case; ``data.max_train`` then keeps a random subset of the training cases (seed
    ``data.cap_seed``, in split order), the same for every model, and (with ``out`` and ``write``)
    records them in ``out/train_cases_<task>.json`` (``{"max_train", "cap_seed", "of", "train": [case
    ids]}``). An error of a task's data names it as ``data.tasks[i] (name)``.
    """
    tasks = []
    for i, spec in enumerate(cfg.data.tasks):
        saved = Path(out) / f"split_{spec.name}.json" if out is not None else None
        split: Any = spec.split if spec.split is not None else list(cfg.data.split)
        if saved is not None and saved.is_file():
            split = str(saved)
        locate(spec.path, f"data.tasks[{i}].path")  # a missing folder: the places searched
        key = f"data.tasks[{i}] ({spec.name})"
        try:
            task = load_segmentation_task(spec.name, spec.path, format=spec.format, num_classes=spec.num_classes,
                                          split=split, seed=cfg.data.seed, **spec.reader)
        except (DataError, ConfigError) as err:  # the same type, with the task's key in front
            raise type(err)(f"{key}: {err}") from err
        for name in ("train", "val", "test"):
            if not task.splits.get(name):
                raise ConfigError(f"{key}: split {name!r} holds no case "
                                  f"({sum(len(v) for v in task.splits.values())} cases in all); add cases or change data.split")
        if saved is not None and write and not saved.is_file():
            task.save_split(saved)
        train, cap = task.splits["train"], cfg.data.max_train
        if cap is not None and cap < len(train):
            keep = np.sort(np.random.default_rng(cfg.data.cap_seed).choice(len(train), cap, replace=False))
            task.splits["train"] = [train[k] for k in keep]
            if out is not None and write:
                write_json(Path(out) / f"train_cases_{spec.name}.json",
                           {"max_train": cap, "cap_seed": cfg.data.cap_seed, "of": len(train),
                            "train": [r.case_id for r in task.splits["train"]]})
        tasks.append(task)
    return tasks


def volume_data_summary(tasks: list[SegmentationTaskData]) -> list[dict[str, Any]]:
    return [{"name": t.name, "source": t.root, "num_classes": t.num_classes, "channels": t.in_channels,
             "spatial_dims": t.spatial_dims, **{f"n_{s}": len(t.splits.get(s, [])) for s in ("train", "val", "test")}}
            for t in tasks]


# ---------------------------------------------------------------------------------------- recipe
class SegmentationRecipe(DecompositionRecipe):
    """One segmentation run: config, tasks (split by patient), datasets, device, output folder."""

    kind = "segmentation"
    select_metric = "dice"
    val_keys = ("dice",)
    size_key = "data.patch_size"
    dense = True
    count_unit = "cases"
    task_loss = staticmethod(dice_ce_loss)
    model_descriptions = {
        "teacher": "foundation segmentation network trained on all tasks (shared body, one 1x1 conv head per task)",
        "student": "LoRKD student: small segmentation body + one low-rank expert per task, routed by task id",
        "expert": "the exported plain expert of the task (student with its expert merged, + its head)",
        "stl": "student network trained on the task alone",
        "stl_kd": "student network trained on the task alone, with the teacher's distillation",
        "mtl": "student network, shared body, one head per task, no experts",
        "mtl_kd": "MTL with the teacher's distillation",
        "student_nokd": "LoRKD student without distillation (kd_weight = feat_weight = 0, no feature pairs)",
    }

    def __init__(self, cfg: SegmentationConfig, out: Path, ctx: DistributedContext, resume: bool = False,
                 progress: bool = True) -> None:
        super().__init__(cfg, out, ctx, resume, progress)
        self.tasks = load_volume_tasks(cfg, self.out, write=ctx.is_main)
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
        self.val_set = self.volumes("val")
        self.test_set = self.volumes("test")
        self.views = SR.case_views(self) if cfg.student.router is not None else None

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

    def volumes(self, split: str, tasks: list[int] | None = None) -> VolumeDataset:
        """Whole preprocessed volumes of ``split``; of ``tasks`` only if given (task ids then index that list)."""
        ids = list(range(len(self.tasks))) if tasks is None else list(tasks)
        return VolumeDataset([self.tasks[t] for t in ids], split, [self._pre[t] for t in ids],
                             in_channels=self.channels, channel_fill=self.cfg.data.channel_fill, cache=self.cache)

    def train_data(self, tasks: list[int] | None = None) -> PatchDataset:
        return self.train_set if tasks is None else self.patches(tasks)

    def dataset(self, split: str, tasks: list[int] | None = None) -> VolumeDataset:
        if tasks is None:
            return {"val": self.val_set, "test": self.test_set}[split]
        return self.volumes(split, tasks)

    def task_counts(self, t: int) -> dict[str, int]:
        return {s: len(self.tasks[t].splits.get(s, [])) for s in ("train", "val", "test")}

    # ---- networks
    def spec(self, net: SegNet) -> dict[str, Any]:
        return segmentation_backbone_spec(net.arch, self.spatial_dims, self.channels, net.channels, net.features,
                                          net.norm, net.num_res_units, net.kwargs)

    def network(self, net: SegNet, num_classes: list[int], experts: dict[str, Any] | None = None) -> MultiTaskSegmenter:
        torch.manual_seed(self.cfg.seed)
        return MultiTaskSegmenter(self.spec(net), num_classes, experts)

    @staticmethod
    def build(meta: dict[str, Any]) -> MultiTaskSegmenter:
        return MultiTaskSegmenter.from_meta(meta)

    def meta(self, model: MultiTaskSegmenter, kind: str, tasks: list[int] | None = None, **extra: Any) -> dict[str, Any]:
        tasks = tasks if tasks is not None else list(range(len(self.tasks)))
        return {"kind": kind, "task_kind": "segmentation", "backbone": model.backbone_spec,
                "num_classes": model.num_classes, "tasks": [self.names[t] for t in tasks], "channels": self.channels,
                "patch_size": list(self.patch), **extra}

    def larger_input(self, spatial: tuple[int, ...], factor: int) -> tuple[tuple[int, ...], Any]:
        bigger = tuple(int(math.ceil(s * factor / 16) * 16) for s in spatial)
        return bigger, list(bigger)

    # ---- scoring
    @staticmethod
    def average(values: list[float]) -> float:
        """The mean over the tasks, NaN (a task without any foreground) left out."""
        return _nanmean(values)

    def score(self, model: nn.Module, data: VolumeDataset, tasks: list[int] | None = None,
              keep: dict[int, dict[str, np.ndarray]] | None = None, final: bool = False) -> dict[int, dict[str, float]]:
        """Dice per task on whole volumes (:func:`score_volumes`); ``final``: also HD95 when
        ``evaluate.hd95``."""
        return score_volumes(model, data, self, tasks, hd95=final and self.cfg.evaluate.hd95, keep=keep)

    # ---- routing without a task id (student.router: each whole case routed once, segmentation_routing)
    route_in_training = False  # the experts train with the true task id; the router beside them

    def router_input_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.views.size)

    def router_views(self) -> Callable[[torch.Tensor, int], torch.Tensor]:
        return self.views.training_rows

    def routed_val_metrics(self, model: nn.Module, router: nn.Module) -> dict[str, float]:
        return SR.routed_val_metrics(self, model, router)

    def routing_summary(self, model: nn.Module, router: nn.Module,
                        outputs: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
        return SR.routing_summary(self, router, outputs)

    def routed_card(self) -> dict[str, Any]:
        return SR.routed_card(self)

    # ---- export and evaluation
    def expert_card(self, t: int) -> dict[str, Any]:
        return expert_card(self, t)

    def export_input_shape(self, t: int) -> tuple[int, ...]:
        return (self.channels, *self.patch)

    def summary(self, teacher: nn.Module, student: nn.Module, results: dict[str, Any]) -> dict[str, Any]:
        """Dice (+ HD95) tables, sizes, FLOPs and latency per patch, the data and notes."""
        example = torch.zeros(1, self.channels, *self.patch)
        teacher_plain = teacher.export_task(0)[0].cpu().eval()
        expert_plain = load_expert(self.out / "experts" / self.names[0]).cpu().eval()
        reps = self.cfg.evaluate.latency_repeats
        keys = ["dice", "hd95"] if self.cfg.evaluate.hd95 else ["dice"]
        return {
            "task_kind": "segmentation", "metric_keys": keys, "primary_metric": "dice",
            "split": "test", "tasks": results["test"], "val": results["val"],
            "params": {"teacher": M.count_parameters(teacher),
                       "teacher_backbone_and_one_head": M.count_parameters(teacher_plain),
                       "student": M.count_parameters(student), "expert": M.count_parameters(expert_plain)},
            "flops": {"teacher": M.count_flops(teacher_plain, example), "expert": M.count_flops(expert_plain, example)},
            "latency_ms": {"teacher": M.cpu_latency_ms(teacher_plain, example, reps),
                           "expert": M.cpu_latency_ms(expert_plain, example, reps)},
            "latency_batch": 1, "latency_input": f"one patch {list(self.patch)}",
            "data": volume_data_summary(self.tasks),
            "models": {**self.model_descriptions, **({"student": ROUTED_STUDENT} if self.cfg.student.router else {})},
            "notes": list(NOTES),
        }


# ---------------------------------------------------------------------------------------- evaluation
def predictor_for(model: nn.Module, task: int):
    """``[n, C, *roi] -> [n, K_task, *roi]`` logits of ``task``: a multi-task network is called with
    task ids, a plain (exported) one directly."""
    if isinstance(model, (MultiTaskNet, TaskRemap)):
        return lambda x: model(x, torch.full((x.shape[0],), task, dtype=torch.long, device=x.device)).logits[task]
    return model


@torch.no_grad()
def predict_case(model: nn.Module, image: torch.Tensor, task: int, run: SegmentationRecipe,
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


def score_volumes(model: nn.Module, dataset: VolumeDataset, run: SegmentationRecipe, tasks: list[int] | None = None,
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
    (the image diagonal in mm), so it is counted, never dropped. A class absent from both label and
    prediction is left out of that case's Dice and HD95 (NaN: MONAI's ``DiceMetric(ignore_empty=True)``
    rule for an empty label, so a class no case holds never counts as a perfect 1; unlike that rule, a
    spurious class keeps its Dice 0). Per class: the
    mean over the task's cases that count it (NaN when none does);
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
            entry["dice"].append(M.dice_per_class(pred, label, k, absent=math.nan))
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
def expert_card(run: SegmentationRecipe, t: int) -> dict[str, Any]:
    """What ``lorkd predict`` needs to run the expert of task ``t`` on a new image or volume."""
    pre = run.preprocess[t]
    task = run.tasks[t]
    return {"task": run.names[t], "task_id": t, "task_kind": "segmentation", "classes": run.num_classes[t],
            "label_values": task_label_values(task), "in_channels": run.channels, "input_channels": run.channels, "task_channels": task.in_channels,
            "channel_fill": run.cfg.data.channel_fill,
            "spatial_dims": run.spatial_dims, "data_spatial_dims": task.spatial_dims,
            "slice_mode": task.spatial_dims == run.spatial_dims + 1, "patch_size": list(run.patch),
            "inference": {"roi_size": list(run.roi), "overlap": run.cfg.evaluate.overlap,
                          "sw_batch_size": run.cfg.evaluate.sw_batch_size, "mode": run.cfg.evaluate.mode},
            "preprocessing": {"normalize": pre.normalize, "normalize_per": "channel",
                              "normalize_detail": NORMALIZE_DETAILS[pre.normalize], "scale": pre.scale,
                              "target_spacing": pre.target_spacing, "target_shape": pre.target_shape,
                              "order": "channels fitted (task_channels, then channel_fill up to in_channels: the "
                                       "filled channels are not normalised), normalise, resample"},
            **_geometry_card(run, t),
            "rebuild_without_lorkd": "nn.Sequential(OrderedDict(backbone=<architecture.kwargs.backbone.factory>"
                                     "(**kwargs), head=ConvNd(feature_dim, num_classes, kernel_size=1)))"}


def task_label_values(task: SegmentationTaskData) -> list[int] | None:
    """The card's ``label_values``: ``label_values[k]`` is the value class ``k`` has in the task's
    mask files, so ``lorkd predict`` writes masks in those values (0/255 masks give 0/255 masks).

    A ``folder`` task maps its mask values to classes on read (``reader.label_values``, else the
    sorted values found, see :func:`~lorkd.data.segmentation.read_image_mask_folder`); other
    formats store class indices (``[0, 1, ..., K-1]``). ``None`` when the mapping does not cover
    every class (``num_classes`` set above the mask values found): masks then hold class indices."""
    refs = [r for cases in task.splits.values() for r in cases]
    values = next((r.label_values for r in refs if getattr(r, "label_values", None) is not None), None)
    if values is None:
        return list(range(task.num_classes))
    if len(values) != task.num_classes:
        log.warning("task %s: its masks hold %d values %s for %d classes; lorkd predict writes its masks as class "
                    "indices 0..%d (card label_values: null)", task.name, len(values), list(values), task.num_classes,
                    task.num_classes - 1)
        return None
    return [int(v) for v in values]


def _geometry_card(run: SegmentationRecipe, t: int) -> dict[str, Any]:
    """Card keys that say how the training volumes were laid out, so ``predict`` handles a new
    volume the same way:

    * ``orientation``: ``"SPL"`` (:data:`~lorkd.data.segmentation.CANONICAL_ORIENTATION`) when the task
      is NIfTI (every 3D NIfTI is reoriented to it on read: reorient an input with
      :func:`lorkd.data.segmentation.reorient` before inference and the mask back to the file's own
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


NOTES = [
    "Dice and HD95 on whole volumes on each case's original grid (sliding-window inference on the preprocessed grid, "
    "logits resampled back to the original shape); per-class keys dice_<c>/hd95_<c> are foreground classes 1..C-1; "
    "HD95 in mm from the file's voxel spacing (NIfTI header; HDF5: reader.spacing or a 'spacing' attribute, else 1 mm "
    "per voxel).",
    "A structure missed (in the label, not predicted) or spurious (predicted, not in the label) counts Dice 0 and "
    "HD95 = the image diagonal in mm (a penalty, never dropped); missed/spurious count those cases (of 'cases'); a "
    "class absent from both label and prediction is left out of that case's Dice and HD95 (not counted, as MONAI's "
    "DiceMetric(ignore_empty=True); never a perfect 1); a class no test case holds or predicts has dice_<c> "
    "NaN and is left out of the mean. A spurious class still counts Dice 0 (MONAI's ignore_empty=True would drop it).",
]
