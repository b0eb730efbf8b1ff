"""The configuration tree of ``lorkd transfer`` (see docs/transfer.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ...config import check
from .classification import TaskFile
from .sections import Optim, Stage, TeacherInput, TeacherSource
from .segmentation import SegEvaluate, SegmentationData

METHODS = ("scratch", "foundation_ft", "foundation_lp", "expert_ft", "expert_lp", "foundation_lora", "kd", "rd")
Method = Literal["scratch", "foundation_ft", "foundation_lp", "expert_ft", "expert_lp", "foundation_lora", "kd", "rd"]


@dataclass
class FoundationSection:
    """Where the foundation model and its experts come from (docs/transfer.md): exactly one of

    ``run``: a folder written by ``lorkd run``: its ``teacher/`` is the foundation model, its
    ``experts/<task>/`` the exported experts; ``experts``: the names of the experts to use
    (default: every expert of the run).

    ``source``: any foundation model, with the ``teacher.source`` schema of the recipes
    (``state_dict`` + ``factory``/``kwargs``, ``torchscript``, ``monai_bundle``, ``torchvision``,
    ``timm``; ``lorkd``: a ``teacher/`` folder); ``features``: the layer of that model whose output
    is the feature (default: its output); ``input``: the teacher input adapter (size, channels,
    in_channels, mean, std); ``experts``: the folder of its exported experts (``RUN/experts``, or
    the run folder).
    """

    run: str | None = None
    source: TeacherSource | None = None
    features: str | None = None
    input: TeacherInput | None = None
    experts: str | list[str] | None = None

    def validate(self, path: str) -> None:
        check((self.run is None) != (self.source is None), path or "foundation",
              "give exactly one of run (a `lorkd run` folder: its teacher/ and experts/) or source (any foundation "
              "model, with the teacher.source schema, and experts: its experts' folder)")
        if self.run is not None:
            check(not isinstance(self.experts, str), f"{path}.experts",
                  "with run, list the names of the run's experts to use (or omit it for all)")
            check(self.experts is None or len(self.experts) >= 1, f"{path}.experts", "list at least one expert or omit it")
            for name in ("features", "input"):
                check(getattr(self, name) is None, f"{path}.{name}", "only with source: a run's teacher has its own")
            return
        check(isinstance(self.experts, str) and bool(self.experts), f"{path}.experts",
              "with source, give the folder of the foundation model's exported experts (RUN/experts or the run folder)")
        check(self.source.kind != "state_dict" or bool(self.source.factory), f"{path}.source.factory",
              "a state_dict needs its architecture: factory 'package.module:function' (with kwargs)")
        if self.source.kind == "lorkd":
            for name in ("features", "input"):
                check(getattr(self, name) is None, f"{path}.{name}", "not with source.kind lorkd (a lorkd teacher has its own)")


@dataclass
class DownstreamData:
    """The downstream tasks: classification ``tasks`` (MedMNIST-layout ``.npz`` files, as ``data.tasks``
    of the recipe), or ``segmentation`` (the ``data`` section of a segmentation recipe) for a
    segmentation foundation run."""

    tasks: list[TaskFile] = field(default_factory=list)
    segmentation: SegmentationData | None = None
    size: int | None = None  # resize to size^2 (size^3); default: the foundation run's data.size
    augment: bool = True
    max_train: int | None = None  # per-task cap on training images, the same subset for every method and seed
    cap_seed: int = 0  # which subset max_train keeps

    def validate(self, path: str) -> None:
        check(bool(self.tasks) != (self.segmentation is not None), path or "data",
              "give either data.tasks (classification .npz files) or data.segmentation, exactly one")
        check(self.segmentation is None or self.max_train is None, f"{path}.max_train",
              "caps classification images; for segmentation set data.segmentation.samples_per_epoch")
        names = [t.name for t in self.tasks]
        check(len(names) == len(set(names)), f"{path}.tasks", f"task names must be unique, got {names}")
        check(self.max_train is None or self.max_train >= 2, f"{path}.max_train", f"must be >= 2, got {self.max_train}")
        check(self.size is None or self.size >= 1, f"{path}.size", f"must be >= 1, got {self.size}")


@dataclass
class LoraSection:
    """``foundation_lora``: lorkd's expert layers with one task on the frozen foundation model."""

    rank: int = 4
    alpha: float = 16.0

    def validate(self, path: str) -> None:
        check(self.rank >= 1, f"{path}.rank", f"must be >= 1, got {self.rank}")
        check(self.alpha > 0, f"{path}.alpha", f"must be > 0, got {self.alpha}")


@dataclass
class KDSection:
    """``kd``: the student learns from labels and from the foundation model with its fitted head."""

    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 4.0

    def validate(self, path: str) -> None:
        check(self.ce_weight >= 0 and self.kd_weight >= 0, path, "weights must be >= 0")
        check(self.ce_weight + self.kd_weight > 0, path, "both weights are 0")
        check(self.temperature > 0, f"{path}.temperature", f"must be > 0, got {self.temperature}")


@dataclass
class RDSection:
    """``rd``: Reprogramming Distillation (see :mod:`lorkd.distill.reprogram`)."""

    input: bool = True  # input-space reprogramming (residual convs on the image)
    feature: bool = True  # feature-space reprogramming (residual MLP on the foundation's features)
    input_hidden: int = 8
    feature_hidden: int = 64
    pairs: list[list[str]] = field(default_factory=lambda: [["layer4", "layer4"]])  # [student layer, foundation layer]
    cka_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 4.0
    foundation_ce_weight: float = 1.0

    def validate(self, path: str) -> None:
        check(self.input or self.feature, path, "set input and/or feature to true")
        for i, pair in enumerate(self.pairs):
            check(len(pair) == 2, f"{path}.pairs[{i}]", f"must be [student_layer, foundation_layer], got {pair}")
        for name in ("cka_weight", "kd_weight", "foundation_ce_weight"):
            check(getattr(self, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.temperature > 0, f"{path}.temperature", f"must be > 0, got {self.temperature}")


def _transfer_stage() -> Stage:
    return Stage(epochs=10, batch_size=64, optim=Optim(name="adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=0.5))


@dataclass
class TransferConfig:
    """``lorkd transfer``: every method trained with the same budget (``train``), augmentation and
    selection on validation, for each downstream task and seed."""

    RECIPE: ClassVar[str] = "transfer"
    foundation: FoundationSection
    data: DownstreamData
    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    student: str | None = None  # the expert whose architecture scratch, kd and rd use (default: the first)
    student_init: Literal["expert", "random"] = "expert"  # kd and rd students start from that expert, or random
    train: Stage = field(default_factory=_transfer_stage)
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    num_workers: int = 0
    lora: LoraSection = field(default_factory=LoraSection)
    kd: KDSection = field(default_factory=KDSection)
    rd: RDSection = field(default_factory=RDSection)
    evaluate: SegEvaluate = field(default_factory=lambda: SegEvaluate(hd95=False))  # segmentation only
    bootstrap: int = 1000  # resamples of the test set for the intervals in the report
    keep_checkpoints: bool = False  # keep each finished method's checkpoints/ (they hold the foundation's weights)

    def validate(self, path: str) -> None:
        check(bool(self.methods), f"{path}methods", "list at least one method")
        check(len(set(self.methods)) == len(self.methods), f"{path}methods", f"listed twice: {self.methods}")
        check(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), f"{path}seeds",
              f"must be a non-empty list of distinct seeds, got {self.seeds}")
        check(self.bootstrap >= 0, f"{path}bootstrap", f"must be >= 0, got {self.bootstrap}")
