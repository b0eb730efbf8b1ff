"""The recipes' configuration trees. Every field has a default except ``data``'s tasks, so a
config may give only ``data.tasks``. See README "Config reference" for the same in prose."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..config import check
from ..engine.trainer import OptimConfig as Optim


@dataclass
class Net:
    """A backbone (see :mod:`lorkd.models.backbones` for the names)."""

    arch: str = "resnet18"
    widen: float = 1.0
    conv1_stride: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        check(self.widen > 0, f"{path}.widen", f"must be > 0, got {self.widen}")
        check(self.conv1_stride >= 1, f"{path}.conv1_stride", f"must be >= 1, got {self.conv1_stride}")


@dataclass
class Stage:
    """How long and how one network is trained."""

    epochs: int = 10
    batch_size: int = 64
    optim: Optim = field(default_factory=Optim)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    amp: Literal["none", "bf16", "fp16"] = "none"  # mixed precision on CUDA (fp16 with a grad scaler)

    def validate(self, path: str) -> None:
        check(self.epochs >= 1, f"{path}.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.checkpoint_every >= 0, f"{path}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")


@dataclass
class Distill:
    """Loss weights of the student (each may be 0): task CE, soft-target KD, feature KD."""

    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 4.0
    feat_weight: float = 0.0
    feat_kind: Literal["mse", "cosine"] = "mse"

    def validate(self, path: str) -> None:
        for name in ("ce_weight", "kd_weight", "feat_weight"):
            check(getattr(self, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.temperature > 0, f"{path}.temperature", f"must be > 0, got {self.temperature}")
        check(self.ce_weight + self.kd_weight + self.feat_weight > 0, path, "all loss weights are 0")


@dataclass
class Experts:
    """The low-rank experts of the student (arguments of ``lorkd.add_experts``)."""

    rank: int | dict[str, int] = 4
    alpha: float = 16.0
    norm: Literal["shared", "per_task"] = "per_task"
    targets: list[str] | None = None

    def validate(self, path: str) -> None:
        ranks = self.rank.values() if isinstance(self.rank, dict) else [self.rank]
        check(all(r >= 1 for r in ranks), f"{path}.rank", f"every rank must be >= 1, got {self.rank}")
        check(self.alpha > 0, f"{path}.alpha", f"must be > 0, got {self.alpha}")

    def as_kwargs(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "norm": self.norm, "targets": self.targets}


@dataclass
class TeacherSection:
    """The foundation model: trained on all tasks, or loaded from ``checkpoint``."""

    net: Net = field(default_factory=lambda: Net(arch="resnet50"))
    checkpoint: str | None = None  # a teacher folder written by an earlier run (teacher/)
    train: Stage = field(default_factory=Stage)


@dataclass
class StudentSection:
    """The LoRKD student: a small backbone with experts, distilled from the teacher."""

    net: Net = field(default_factory=lambda: Net(arch="resnet18", widen=0.5))
    experts: Experts = field(default_factory=Experts)
    distill: Distill = field(default_factory=Distill)
    train: Stage = field(default_factory=Stage)


BASELINES = ("stl", "stl_kd", "mtl", "mtl_kd", "student_nokd")


@dataclass
class Baselines:
    """Comparisons trained by the same code with the student's budget (its ``train`` stage).

    ``stl``: one student network per task, alone; ``mtl``: one student network with shared
    backbone and one head per task, no experts; ``*_kd``: the same with the student's
    distillation losses; ``student_nokd``: the LoRKD student with ``kd_weight=feat_weight=0``.
    """

    run: list[Literal["stl", "stl_kd", "mtl", "mtl_kd", "student_nokd"]] = field(default_factory=list)


@dataclass
class Evaluate:
    latency_batch: int = 1
    latency_repeats: int = 20


@dataclass
class Export:
    """How experts are exported (always: safetensors + card.json)."""

    onnx: bool = False  # reserved: ONNX export is not implemented yet, and asking for it is an error

    def validate(self, path: str) -> None:
        check(not self.onnx, f"{path}.onnx", "ONNX export is not implemented yet; experts are exported as "
              "safetensors state dicts of plain PyTorch models (set onnx: false)")


@dataclass
class TaskFile:
    """One classification task: a MedMNIST-layout ``.npz`` file (2D images or 3D volumes)."""

    name: str
    path: str
    num_classes: int | None = None
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


@dataclass
class ClassificationData:
    """``tasks`` (files) or ``synthetic`` (embedded data), not both."""

    tasks: list[TaskFile] = field(default_factory=list)
    synthetic: Synthetic | None = None
    size: int | None = None  # resize every image to size x size
    channels: int | None = None  # default: the most channels of any task
    augment: bool = True
    sampler: Literal["proportional", "balanced"] = "proportional"
    mean: float = 0.5
    std: float = 0.5

    def validate(self, path: str) -> None:
        check(bool(self.tasks) != (self.synthetic is not None), f"{path or 'data'}",
              "give either data.tasks (a list of {name, path}) or data.synthetic, exactly one")
        names = [t.name for t in self.tasks]
        check(len(names) == len(set(names)), f"{path}.tasks", f"task names must be unique, got {names}")


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
