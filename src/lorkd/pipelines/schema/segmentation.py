"""The segmentation recipe's configuration tree (``recipe: segmentation`` in the YAML).

It reuses the shared sections (:mod:`.sections`) (:class:`Stage`, :class:`Distill`,
:class:`Experts`, :class:`Baselines`, :class:`Export`, the teacher/student sections) and
replaces only what differs: the data (volume/image folders, patches, preprocessing), the
network (a MONAI segmentation body) and evaluation (sliding-window inference, Dice, HD95).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ...config import check, unknown_key
from ...data.augment import Augment
from ...data.segmentation import Preprocess, reader_options
from ...engine.trainer import OptimConfig as Optim
from .sections import (
    Baselines, Distill, Experts, Export, Logging, Stage, StudentSection, TeacherAdapt, TeacherSection, check_routing,
)

__all__ = ["AugmentConfig", "PreprocessConfig", "SegEvaluate", "SegNet", "SegStudentSection", "SegTaskFile", "SegTeacherSection",
           "SegmentationConfig", "SegmentationData"]


@dataclass
class PreprocessConfig:
    """Per-case preprocessing (see :class:`lorkd.data.segmentation.Preprocess`): intensity
    normalisation, then at most one of ``scale`` / ``target_spacing`` / ``target_shape``."""

    normalize: Literal["zscore", "zscore_nonzero", "minmax", "none"] = "zscore"
    scale: float | list[float] | None = None
    target_spacing: list[float | None] | None = None
    target_shape: list[int | None] | None = None

    def validate(self, path: str) -> None:
        given = [k for k in ("scale", "target_spacing", "target_shape") if getattr(self, k) is not None]
        check(len(given) <= 1, path, f"give at most one of scale/target_spacing/target_shape, got {given}")
        scale = self.scale if isinstance(self.scale, list) else [self.scale] if self.scale is not None else []
        check(all(s > 0 for s in scale), f"{path}.scale", f"must be > 0, got {self.scale}")

    def build(self) -> Preprocess:
        def tup(v):
            return tuple(v) if isinstance(v, list) else v

        return Preprocess(self.normalize, tup(self.scale), tup(self.target_spacing), tup(self.target_shape))


@dataclass
class SegTaskFile:
    """One segmentation task: a folder read by ``format`` (``hdf5``: ``volumes/*.h5``; ``msd``: a
    Decathlon folder with ``dataset.json``; ``folder``: 2D ``images/`` + ``masks/``).

    ``reader`` holds keyword arguments of the format's reader (e.g. ``image_key``, ``patient_rule``,
    ``label_values``; :func:`~lorkd.data.segmentation.reader_options` lists them, and any other key
    is a ConfigError at load time naming it, with the closest known key); ``split`` and ``preprocess``
    override ``data.split`` / ``data.preprocess`` for this task (``split`` may also name a JSON file
    written by an earlier run)."""

    name: str
    path: str
    format: Literal["hdf5", "msd", "folder"] = "hdf5"
    num_classes: int | None = None
    reader: dict[str, Any] = field(default_factory=dict)
    split: list[float] | str | None = None
    preprocess: PreprocessConfig | None = None

    def validate(self, path: str) -> None:
        check(self.num_classes is None or self.num_classes >= 2, f"{path}.num_classes",
              f"must be >= 2 (background included), got {self.num_classes}")
        known = reader_options(self.format)
        for key in self.reader:
            if key not in known:
                raise unknown_key(f"{path}.reader", key, known)


@dataclass(frozen=True)
class AugmentConfig(Augment):
    """``data.augment``: the fields of :class:`lorkd.data.augment.Augment` (seeded flips, rotation
    + zoom, intensity; drawn from ``(seed, epoch, patch index)`` so reruns and resumed runs are
    identical) plus ``enabled`` (on by default)."""

    enabled: bool = True

    def __post_init__(self) -> None:  # checked by validate, which names the dotted key
        pass

    def validate(self, path: str) -> None:
        Augment.check_settings(self, path)

    def build(self) -> Augment | None:
        """The :class:`~lorkd.data.augment.Augment`, or ``None`` when disabled."""
        if not self.enabled:
            return None
        return Augment(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Augment)})


@dataclass
class SegmentationData:
    """Tasks, patches and preprocessing."""

    tasks: list[SegTaskFile]
    patch_size: list[int] = field(default_factory=lambda: [16, 64, 64])  # 2 entries: 2D (3D tasks are sliced)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    samples_per_epoch: int = 256  # training patches per epoch, all tasks together
    foreground_ratio: float = 0.5  # share of patches centred on a foreground voxel
    split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # train/val/test, by patient
    seed: int = 0  # seed of the patient split
    channel_fill: Literal["zeros", "repeat"] = "zeros"  # tasks with fewer channels than the widest
    sampler: Literal["proportional", "balanced"] = "proportional"
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training patches only
    max_train: int | None = None  # per-task cap on training cases: a random subset, the same for every model
    cap_seed: int = 0  # which subset max_train keeps

    def validate(self, path: str) -> None:
        p = path or "data"
        check(bool(self.tasks), f"{p}.tasks", "give at least one task {name, path, format}")
        names = [t.name for t in self.tasks]
        check(len(names) == len(set(names)), f"{p}.tasks", f"task names must be unique, got {names}")
        check(len(self.patch_size) in (2, 3) and min(self.patch_size) >= 1, f"{p}.patch_size",
              f"must be 2 or 3 positive sizes, got {self.patch_size}")
        check(self.samples_per_epoch >= len(self.tasks), f"{p}.samples_per_epoch",
              f"must be >= the number of tasks, got {self.samples_per_epoch}")
        check(0.0 <= self.foreground_ratio <= 1.0, f"{p}.foreground_ratio", f"must lie in [0, 1], got {self.foreground_ratio}")
        check(len(self.split) == 3 and min(self.split) > 0 and abs(sum(self.split) - 1) < 1e-6, f"{p}.split",
              f"must be 3 positive fractions (train, val, test) adding up to 1, got {self.split}")
        check(self.max_train is None or self.max_train >= 1, f"{p}.max_train", f"must be >= 1, got {self.max_train}")


@dataclass
class SegNet:
    """A MONAI segmentation body (see :func:`lorkd.models.segmenter.segmentation_backbone_spec`)."""

    arch: Literal["unet", "dynunet", "segresnet"] = "unet"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    features: int = 16  # width F of the feature map the task heads read
    norm: str = "batch"
    num_res_units: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        check(len(self.channels) >= 2 and min(self.channels) >= 1, f"{path}.channels",
              f"must list >= 2 positive widths, got {self.channels}")
        check(self.features >= 1, f"{path}.features", f"must be >= 1, got {self.features}")


def _seg_stage() -> Stage:
    return Stage(epochs=10, batch_size=8, optim=Optim(name="adamw", lr=2e-3, weight_decay=1e-4))


@dataclass
class SegTeacherSection(TeacherSection):
    net: SegNet = field(default_factory=SegNet)
    train: Stage = field(default_factory=_seg_stage)
    adapt: TeacherAdapt = field(default_factory=lambda: TeacherAdapt(batch_size=8))  # batches of patches


@dataclass
class SegStudentSection(StudentSection):
    net: SegNet = field(default_factory=lambda: SegNet(channels=[8, 16, 32, 64], features=8))
    experts: Experts = field(default_factory=Experts)
    distill: Distill = field(default_factory=lambda: Distill(temperature=2.0))
    train: Stage = field(default_factory=_seg_stage)


@dataclass
class SegEvaluate:
    """Sliding-window inference on whole preprocessed volumes (val for selection, test for metrics)."""

    roi_size: list[int] | None = None  # default: data.patch_size
    overlap: float = 0.25
    sw_batch_size: int = 4
    mode: Literal["constant", "gaussian"] = "constant"
    hd95: bool = True  # HD95 at the final evaluation (never during model selection)
    latency_repeats: int = 5

    def validate(self, path: str) -> None:
        check(0.0 <= self.overlap < 1.0, f"{path}.overlap", f"must lie in [0, 1), got {self.overlap}")
        check(self.sw_batch_size >= 1, f"{path}.sw_batch_size", f"must be >= 1, got {self.sw_batch_size}")
        check(self.roi_size is None or min(self.roi_size) >= 1, f"{path}.roi_size", f"must be positive, got {self.roi_size}")


@dataclass
class SegmentationConfig:
    """The segmentation recipe: teacher -> decompose -> baselines -> export -> evaluate -> report."""

    RECIPE: ClassVar[str] = "segmentation"  # the YAML key `recipe` that selects this tree
    data: SegmentationData
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    teacher: SegTeacherSection = field(default_factory=SegTeacherSection)
    student: SegStudentSection = field(default_factory=SegStudentSection)
    baselines: Baselines = field(default_factory=Baselines)
    evaluate: SegEvaluate = field(default_factory=SegEvaluate)
    export: Export = field(default_factory=Export)
    logging: Logging = field(default_factory=Logging)
    trust_code: bool = False  # allow saved specs to name factories outside the known namespaces (lorkd.factories)

    def validate(self, path: str) -> None:
        check_routing(self.student, self.baselines, self.RECIPE)
        roi = self.evaluate.roi_size
        check(roi is None or len(roi) == len(self.data.patch_size), "evaluate.roi_size",
              f"needs {len(self.data.patch_size)} entries like data.patch_size, got {roi}")
