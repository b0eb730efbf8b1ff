"""The classification recipe's configuration tree: its data section and the whole tree. Every
field has a default except ``data``'s tasks, so a config may give only ``data.tasks``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ...config import check
from .sections import Baselines, Evaluate, Export, Logging, StudentSection, TeacherSection, check_routing


@dataclass
class TaskFile:
    """One classification task: a MedMNIST-layout ``.npz`` file (2D images or 3D volumes)."""

    name: str
    path: str
    num_classes: int | None = None
    class_names: list[str] | None = None  # written to the experts' cards; MedMNIST files are named by default
    spatial_dims: int | None = None  # 2 or 3; default: inferred from the images' shape

    def validate(self, path: str) -> None:
        check(self.spatial_dims in (None, 2, 3), f"{path}.spatial_dims", f"must be 2 or 3, got {self.spatial_dims}")


@dataclass
class Synthetic:
    """The embedded default data set, generated in code (see :mod:`lorkd.data.synthetic`)."""

    num_tasks: int = 3
    size: int = 28
    n_train: int = 600
    n_val: int = 150
    n_test: int = 300
    seed: int = 0
    # which label rules: "basic" (the default, as always) or "hard" (subtle cues that need many images)
    family: Literal["basic", "hard"] = "basic"


@dataclass
class Select:
    """How ``data.max_train`` picks each task's training images (class-stratified, seed ``cap_seed``):
    ``random`` (the default, as always), ``diverse`` (DiSF's greedy) or ``kcenter`` (greedy
    k-centre) on the pooled, L2-normalised features of the foundation model (``teacher.source``).
    The choice is written to ``<run>/selection.json`` (or ``file``) and read back while it matches."""

    method: Literal["random", "diverse", "kcenter"] = "random"
    features: str | None = None  # a layer of the foundation model; default: its teacher.features (or its output)
    batch_size: int = 256  # images per forward pass while reading the features
    file: str | None = None  # a selection.json shared by several runs (e.g. the seeds); default: the run folder's

    def validate(self, path: str) -> None:
        check(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class ClassificationData:
    """``tasks`` (files) or ``synthetic`` (embedded data), not both."""

    tasks: list[TaskFile] = field(default_factory=list)
    synthetic: Synthetic | None = None
    size: int | None = None  # resize every image to size x size
    channels: int | None = None  # default: the most channels of any task
    # training images per task of the student and every baseline (a class-stratified subset of the
    # train split); a teacher the run trains sees the whole split. None: every image, for all.
    student_n_train: int | None = None
    augment: bool = True
    sampler: Literal["proportional", "balanced"] = "proportional"
    mean: float = 0.5
    std: float = 0.5
    max_train: int | None = None  # per-task cap on training images: a class-stratified subset, the same for every model
    cap_seed: int = 0  # which subset max_train keeps
    select: Select = field(default_factory=Select)  # how max_train picks its subset

    def validate(self, path: str) -> None:
        check(self.select.method == "random" or self.max_train is not None, f"{path}.select.method",
              f"{self.select.method} selects data.max_train images per task: set data.max_train")
        check(bool(self.tasks) != (self.synthetic is not None), f"{path or 'data'}",
              "give either data.tasks (a list of {name, path}) or data.synthetic, exactly one")
        names = [t.name for t in self.tasks]
        check(len(names) == len(set(names)), f"{path}.tasks", f"task names must be unique, got {names}")
        check(self.max_train is None or self.max_train >= 2, f"{path}.max_train", f"must be >= 2, got {self.max_train}")
        check(self.student_n_train is None or self.student_n_train >= 1, f"{path}.student_n_train",
              f"must be >= 1, got {self.student_n_train}")


@dataclass
class ClassificationConfig:
    """The classification recipe: teacher -> decompose -> export -> evaluate -> report."""

    RECIPE: ClassVar[str] = "classification"  # the YAML key `recipe` that selects this tree
    data: ClassificationData
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    num_workers: int = 0
    teacher: TeacherSection = field(default_factory=TeacherSection)
    student: StudentSection = field(default_factory=StudentSection)
    baselines: Baselines = field(default_factory=Baselines)
    evaluate: Evaluate = field(default_factory=Evaluate)
    export: Export = field(default_factory=Export)
    logging: Logging = field(default_factory=Logging)
    trust_code: bool = False  # allow saved specs to name factories outside the known namespaces (lorkd.factories)

    def validate(self, path: str) -> None:
        check(self.data.select.method == "random" or self.teacher.source is not None, "data.select.method",
              f"{self.data.select.method} selects on a foundation model's features: it needs teacher.source (a "
              "teacher the run trains would be trained on the subset it selects)")
        check_routing(self.student, self.baselines, self.RECIPE)
