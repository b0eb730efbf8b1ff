"""The sections every recipe's configuration tree shares (nets, stages, distillation, experts,
teacher, student, baselines, evaluation, export, logging). Every field has a default. See
docs/configuration.md for the same in prose."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field, replace
from itertools import product
from typing import Any, ClassVar, Literal

from ...config import check
from ...engine.trainer import OptimConfig as Optim
from ...errors import ConfigError


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
class EarlyStop:
    """Stop a stage's training when its validation selection metric has not improved by more than
    ``min_delta`` for ``patience`` epochs in a row (the best epoch is kept, as always)."""

    patience: int = 5
    min_delta: float = 0.0

    def validate(self, path: str) -> None:
        check(self.patience >= 1, f"{path}.patience", f"must be >= 1, got {self.patience}")
        check(self.min_delta >= 0, f"{path}.min_delta", f"must be >= 0, got {self.min_delta}")


@dataclass
class Stage:
    """How long and how one network is trained."""

    epochs: int = 10
    batch_size: int = 64
    optim: Optim = field(default_factory=Optim)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    amp: Literal["none", "bf16", "fp16"] = "none"  # mixed precision on CUDA (fp16 with a grad scaler)
    early_stop: EarlyStop | None = None  # None: train every epoch
    # > 0: before each validation, BatchNorm running statistics are recomputed as exact averages over
    # this many training images per task, without augmentation (0: the running averages of training)
    recompute_norm_stats: int = 0
    # decay of a moving average of the weights (e.g. 0.999): the average is validated, selected and kept
    ema: float | None = None
    label_smoothing: float = 0.0  # of the classification cross-entropy (0: off); not for segmentation

    def validate(self, path: str) -> None:
        check(self.epochs >= 1, f"{path}.epochs", f"must be >= 1, got {self.epochs}")
        check(self.ema is None or 0.0 < self.ema < 1.0, f"{path}.ema", f"must be a decay in (0, 1) or null, got {self.ema}")
        check(0.0 <= self.label_smoothing < 1.0, f"{path}.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        check(self.batch_size >= 1, f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.checkpoint_every >= 0, f"{path}.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.recompute_norm_stats >= 0, f"{path}.recompute_norm_stats",
              f"must be >= 0 (training images per task; 0: off), got {self.recompute_norm_stats}")


@dataclass
class FeaturePair:
    """Feature distillation between a named layer of the student and one of the teacher.

    ``student``: a layer of the student as named in its exported expert: ``backbone`` (the
    backbone's output) or ``backbone.<layer>`` (``<layer>`` a name of the plain backbone, e.g.
    ``backbone.layer3`` or ``backbone.model.1.submodule``). ``teacher``: a layer of
    ``getattr(teacher, "feature_root", teacher)``; for a lorkd-trained teacher that is the teacher
    network itself, so the same ``backbone.<layer>`` names. ``kind``: ``mse`` / ``cosine`` through a
    learned 1x1 projector (student width -> teacher width; the student map is resized to the
    teacher's spatial size), or ``cka`` (1 - linear CKA, no projector)."""

    student: str
    teacher: str
    weight: float = 1.0
    kind: Literal["mse", "cosine", "cka"] = "mse"

    def validate(self, path: str) -> None:
        check(self.weight >= 0, f"{path}.weight", f"must be >= 0, got {self.weight}")
        for name in ("student", "teacher"):
            check(bool(getattr(self, name).strip()), f"{path}.{name}", "must name a layer, got an empty string")


@dataclass
class DistillSearch:
    """A grid over the distillation settings, scored on the validation split (see
    :mod:`lorkd.pipelines.stages.search`); off while every list is empty. An empty list keeps the
    configured value; ``feat_weight`` sets the weight of every feature term that is on
    (``feat_weight`` > 0 and each of ``features``); ``epochs``: the budget of each candidate
    (default: ``student.train.epochs``)."""

    kd_weight: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    feat_weight: list[float] = field(default_factory=list)
    epochs: int | None = None

    def validate(self, path: str) -> None:
        for name in ("kd_weight", "feat_weight"):
            check(all(v >= 0 for v in getattr(self, name)), f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(all(v > 0 for v in self.temperature), f"{path}.temperature", f"must be > 0, got {self.temperature}")
        check(self.epochs is None or self.epochs >= 1, f"{path}.epochs", f"must be >= 1, got {self.epochs}")
        check(self.epochs is None or self.enabled, path,
              "epochs is set but no list of values is (kd_weight, temperature, feat_weight)")

    @property
    def enabled(self) -> bool:
        return bool(self.kd_weight or self.temperature or self.feat_weight)

    def grid(self, distill: "Distill") -> list[dict[str, float | None]]:
        """The candidates in grid order: ``{"kd_weight", "temperature", "feat_weight"}`` each
        (``feat_weight`` ``None`` when not searched: the configured feature weights stay)."""
        return [{"kd_weight": kd, "temperature": t, "feat_weight": f}
                for kd, t, f in product(self.kd_weight or [distill.kd_weight], self.temperature or [distill.temperature],
                                        self.feat_weight or [None])]


@dataclass
class Distill:
    """Loss weights of the student (each may be 0): task CE, soft-target KD, feature KD.

    ``feat_weight``/``feat_kind``: feature KD between the final features of student and teacher
    (pooled ``[B, F]`` for classification, the feature map for segmentation); ``features``: more
    pairs of named layers. Both are terms of one mechanism (:mod:`lorkd.pipelines.core.features`)."""

    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 4.0
    feat_weight: float = 0.0
    feat_kind: Literal["mse", "cosine", "cka"] = "mse"
    features: list[FeaturePair] = field(default_factory=list)
    search: DistillSearch = field(default_factory=DistillSearch)

    def validate(self, path: str) -> None:
        for name in ("ce_weight", "kd_weight", "feat_weight"):
            check(getattr(self, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        check(self.temperature > 0, f"{path}.temperature", f"must be > 0, got {self.temperature}")
        check(self.ce_weight + self.kd_weight + self.feat_weight + sum(p.weight for p in self.features) > 0, path,
              "all loss weights are 0")
        if self.search.feat_weight:
            check(self.feat_weight > 0 or any(p.weight > 0 for p in self.features), f"{path}.search.feat_weight",
                  "no feature term to weigh: set feat_weight > 0 or list features")

    @property
    def uses_teacher(self) -> bool:
        """Whether any term reads the teacher."""
        return self.kd_weight > 0 or self.feat_weight > 0 or any(p.weight > 0 for p in self.features)

    def without_teacher(self) -> "Distill":
        """The same weights with every teacher term off (the no-KD baselines)."""
        return replace(self, kd_weight=0.0, feat_weight=0.0, features=[], search=DistillSearch())


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
class KeyMap:
    """How the keys of a weights file are rewritten before loading (see :func:`lorkd.load_foundation`)."""

    strip_prefix: str | None = None  # e.g. "module." (DDP) or "model."
    rename: list[list[str]] = field(default_factory=list)  # [regex, replacement] pairs, applied in order

    def validate(self, path: str) -> None:
        check(all(len(pair) == 2 for pair in self.rename), f"{path}.rename",
              f"give [regex, replacement] pairs, got {self.rename}")


TEACHER_KINDS = ("lorkd", "state_dict", "torchscript", "monai_bundle", "torchvision", "timm")


@dataclass
class TeacherSource:
    """Where the foundation model comes from (docs/foundation.md).

    ``lorkd``: a ``teacher/`` folder of an earlier run; ``state_dict``: a weights file plus the
    architecture (``factory`` + ``kwargs``, else the backbone ``teacher.net``); ``torchscript``; a
    ``monai_bundle`` folder; ``torchvision``/``timm``: model ``name`` + weights file."""

    kind: Literal["lorkd", "state_dict", "torchscript", "monai_bundle", "torchvision", "timm"]
    path: str
    factory: str | None = None  # "package.module:function" building the architecture (state_dict)
    kwargs: dict[str, Any] = field(default_factory=dict)  # of factory, or of the torchvision/timm model
    name: str | None = None  # torchvision/timm model name
    key_map: KeyMap = field(default_factory=KeyMap)
    strict: bool = True  # every key must fit (False: missing/unexpected keys are skipped)
    network_key: str = "network_def"  # monai_bundle: the config entry of the network

    def validate(self, path: str) -> None:
        check(bool(self.path), f"{path}.path", "give the file or folder of the teacher")
        check(self.kind not in ("torchvision", "timm") or bool(self.name), f"{path}.name",
              f"kind {self.kind} needs the model name (e.g. resnet50)")


@dataclass
class TeacherInput:
    """What the teacher's input needs (applied to the teacher's input only, 2D and 3D)."""

    size: int | list[int] | None = None  # resize to this (one number: every spatial dim)
    channels: Literal["repeat", "average"] | None = None  # data channels -> in_channels
    in_channels: int | None = None  # default: the teacher's first convolution's input channels
    mean: float | list[float] | None = None  # the teacher's normalisation, on [0, 1] images
    std: float | list[float] | None = None

    def validate(self, path: str) -> None:
        stds = self.std if isinstance(self.std, list) else [self.std] if self.std is not None else []
        check(all(s > 0 for s in stds), f"{path}.std", f"must be > 0, got {self.std}")
        sizes = self.size if isinstance(self.size, list) else [self.size] if self.size is not None else []
        check(all(s >= 1 for s in sizes), f"{path}.size", f"must be >= 1, got {self.size}")
        check(self.in_channels is None or self.in_channels >= 1, f"{path}.in_channels", f"must be >= 1, got {self.in_channels}")


@dataclass
class TeacherAdapt(Stage):
    """Fitting a loaded teacher to the run's tasks: ``heads`` (linear probe: one head per task on
    the frozen model), ``finetune`` (heads and the whole model) or ``none``. ``None``: ``heads`` when
    some task has no output in ``teacher.heads``, else ``none``."""

    mode: Literal["none", "heads", "finetune"] | None = None
    epochs: int = 5
    optim: Optim = field(default_factory=lambda: Optim(name="adamw", lr=1e-3, weight_decay=1e-4))


@dataclass
class EnsembleMember(TeacherSource):
    """One member of a teacher ensemble (``teacher.source`` given as a list): a source like
    :class:`TeacherSource`, plus what differs between architectures. ``heads``, ``features`` and
    ``input`` replace the teacher section's for this member (``None``: the section's); a ``lorkd``
    member has its own heads and takes none of them. ``label`` names it in the report, in errors and
    in ``teacher.ensemble.features_from`` (default: its index)."""

    label: str | None = None
    heads: dict[str, int | list[int] | str] | None = None
    features: str | None = None
    input: TeacherInput | None = None

    def validate(self, path: str) -> None:
        super().validate(path)
        for name in ("heads", "features", "input"):
            check(self.kind != "lorkd" or getattr(self, name) is None, f"{path}.{name}",
                  "only for a loaded foundation model; a lorkd teacher folder has its own heads")


@dataclass
class TeacherEnsemble:
    """How an ensemble teacher (``teacher.source`` given as a list) combines its members: ``weights``
    ``mean`` (the members' logits averaged per task) or ``val_accuracy`` (weighted per task by each
    member's validation metric, the recipe's selection metric: accuracy, Dice for segmentation,
    normalised to sum to 1 per task); ``features_from``: the member (index or label) whose features
    and layers feature distillation reads."""

    weights: Literal["mean", "val_accuracy"] = "mean"
    features_from: int | str = 0


@dataclass
class TeacherSection:
    """The foundation model: trained by the run on all tasks, or loaded from ``source``.

    With ``source``: ``heads`` maps tasks to outputs the teacher already has (an output index,
    a ``[start, stop]`` slice of its channels, or a layer name); other tasks get a head on
    ``features`` (a layer name; default: the model's output), fitted by ``adapt``."""

    net: Net = field(default_factory=lambda: Net(arch="resnet50"))
    checkpoint: str | None = None  # old spelling of source: {kind: lorkd, path: ...}
    train: Stage = field(default_factory=Stage)
    source: TeacherSource | list[EnsembleMember] | None = None  # a list: an ensemble (models/ensemble.py)
    heads: dict[str, int | list[int] | str] = field(default_factory=dict)
    features: str | None = None
    input: TeacherInput | None = None
    adapt: TeacherAdapt = field(default_factory=TeacherAdapt)
    ensemble: TeacherEnsemble | None = None  # with a list of sources; None: TeacherEnsemble()

    def validate(self, path: str) -> None:
        p = path or "teacher"
        if self.checkpoint is not None:  # alias of the old key
            check(self.source is None, f"{p}.checkpoint", f"give {p}.source only (checkpoint is its old spelling)")
            logging.getLogger("lorkd").warning("%s.checkpoint is deprecated: use %s.source: {kind: lorkd, path: %s}",
                                               p, p, self.checkpoint)
            self.source, self.checkpoint = TeacherSource(kind="lorkd", path=self.checkpoint), None
        if isinstance(self.source, list):
            self._validate_ensemble(p)
            return
        check(self.ensemble is None, f"{p}.ensemble", f"only with a list of sources ({p}.source: [...], an ensemble)")
        own = self.source is None or self.source.kind == "lorkd"
        what = "trains its own teacher" if self.source is None else "reuses a lorkd teacher folder, which has its heads"
        for name in ("heads", "features", "input"):
            check(not own or not getattr(self, name), f"{p}.{name}",
                  f"only for a loaded foundation model (teacher.source of kind state_dict, torchscript, ...); "
                  f"this run {what}")
        allowed = (None, "none") if self.source is None else (None, "none", "finetune")
        check(self.adapt.mode in allowed or not own, f"{p}.adapt.mode",
              f"only for a loaded foundation model; this run {what}"
              + ("" if self.source is None else " (finetune trains them and the network on this run's tasks)"))

    def _validate_ensemble(self, p: str) -> None:
        members = self.source
        check(len(members) >= 2, f"{p}.source", f"an ensemble needs two or more sources, got {len(members)} (give "
              "one source as a mapping)")
        labels = member_labels(members)
        for i, label in enumerate(labels):
            check(labels.index(label) == i, f"{p}.source[{i}].label", f"{label!r} names two members")
        self.ensemble = self.ensemble or TeacherEnsemble()
        ensemble_member(members, self.ensemble.features_from, f"{p}.ensemble.features_from")
        if all(m.kind == "lorkd" for m in members):
            for name in ("heads", "features", "input"):
                check(not getattr(self, name), f"{p}.{name}", "only for a loaded foundation model; every member of "
                      "this ensemble is a lorkd teacher folder, which has its heads")


def member_labels(members: list[EnsembleMember]) -> list[str]:
    """The members' labels (``label``, else the index as a string)."""
    return [m.label if m.label is not None else str(i) for i, m in enumerate(members)]


def ensemble_member(members: list[EnsembleMember], which: int | str, key: str) -> int:
    """The index of member ``which`` (an index, or a label).

    Raises:
        ConfigError: no such member (names ``key`` and the members).
    """
    labels = member_labels(members)
    if isinstance(which, int) and not isinstance(which, bool):
        check(0 <= which < len(members), key, f"member {which} is out of range (members 0..{len(members) - 1})")
        return which
    check(which in labels, key, f"no member labelled {which!r}; the members are {labels}")
    return labels.index(which)


@dataclass
class RouterNet:
    """The router network (:class:`lorkd.models.router.TaskRouter`): one stride-2 conv stage per
    entry of ``channels``, global pooling, a linear head to the task logits and a projection head
    of ``projection_dim`` for TwD."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    projection_dim: int = 32

    def validate(self, path: str) -> None:
        check(bool(self.channels) and all(c >= 1 for c in self.channels), f"{path}.channels",
              f"must be a non-empty list of integers >= 1, got {self.channels}")
        check(self.projection_dim >= 1, f"{path}.projection_dim", f"must be >= 1, got {self.projection_dim}")


@dataclass
class Router:
    """MoLA-Router: a router picks each image's expert, so no task id is needed at inference
    (see docs/python-api.md, "MoLA-Router"). Trained with the student: the task losses through the
    routed experts (after ``teacher_forcing`` epochs routed by the true task id), plus
    ``twd_weight`` x TwD (supervised contrastive, temperature ``twd_temperature``) on the router's
    projection, plus ``task_loss_weight`` x cross-entropy of its logits on the task id.
    ``temperature`` / ``top_k``: the routing weights in training (softmax of logits / temperature,
    the ``top_k`` largest kept; ``None``: all). Inference routes each image to its top-1 task.
    Segmentation: the router sees each whole case resized to ``input_size`` (default
    ``data.patch_size``) and routes it once (top-1); the experts train with the true task id, so
    ``temperature``, ``top_k`` and ``teacher_forcing`` are classification settings."""

    net: RouterNet = field(default_factory=RouterNet)
    twd_weight: float = 0.1
    twd_temperature: float = 0.07
    task_loss_weight: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    teacher_forcing: float = 1.0  # epochs at the start routed by the true task id
    input_size: list[int] | None = None  # segmentation: the size each whole case is resized to for the router

    def validate(self, path: str) -> None:
        check(self.input_size is None or (bool(self.input_size) and min(self.input_size) >= 1), f"{path}.input_size",
              f"must be a list of sizes >= 1, got {self.input_size}")
        for name in ("twd_weight", "task_loss_weight", "teacher_forcing"):
            check(getattr(self, name) >= 0, f"{path}.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("twd_temperature", "temperature"):
            check(getattr(self, name) > 0, f"{path}.{name}", f"must be > 0, got {getattr(self, name)}")
        check(self.top_k is None or self.top_k >= 1, f"{path}.top_k", f"must be null or >= 1, got {self.top_k}")
        check(self.task_loss_weight > 0 or self.top_k != 1, f"{path}.task_loss_weight",
              "must be > 0 with top_k 1: the router's logits then get no gradient from the task losses "
              "(an argmax), only from this cross-entropy")
        check(self.twd_weight + self.task_loss_weight > 0 or self.top_k != 1, path,
              "twd_weight and task_loss_weight are both 0: nothing trains the router")


@dataclass
class StudentSection:
    """The LoRKD student: a small backbone with experts, distilled from the teacher; with
    ``router``, routed by a MoLA-Router instead of the task id."""

    net: Net = field(default_factory=lambda: Net(arch="resnet18", widen=0.5))
    experts: Experts = field(default_factory=Experts)
    distill: Distill = field(default_factory=Distill)
    train: Stage = field(default_factory=Stage)
    router: Router | None = None


BASELINES = ("stl", "stl_kd", "mtl", "mtl_kd", "student_nokd", "mola_grad")


@dataclass
class Baselines:
    """Comparisons trained by the same code with the student's budget (its ``train`` stage).

    ``stl``: one student network per task, alone; ``mtl``: one student network with shared
    backbone and one head per task, no experts; ``*_kd``: the same with the student's
    distillation losses; ``student_nokd``: the LoRKD student with ``kd_weight=feat_weight=0``;
    ``mola_grad`` (with ``student.router``): the same student with task ids, no router.
    """

    run: list[Literal["stl", "stl_kd", "mtl", "mtl_kd", "student_nokd", "mola_grad"]] = field(default_factory=list)


def check_routing(student: StudentSection, baselines: Baselines, recipe: str) -> None:
    """Check ``student.router`` against the recipe and ``baselines.run``.

    Raises:
        ConfigError: ``student.router`` in a recipe other than classification and segmentation;
            ``mola_grad`` in ``baselines.run`` without ``student.router``, or in segmentation;
            ``input_size`` in classification; in segmentation, ``temperature``, ``top_k`` or
            ``teacher_forcing`` away from their defaults (the message names the key).
    """
    r = student.router
    check(r is None or recipe in ("classification", "segmentation"), "student.router",
          f"routing without a task id is built for the classification and segmentation recipes, not {recipe}; "
          "remove it")
    check(r is not None or "mola_grad" not in baselines.run, "baselines.run",
          "mola_grad is the baseline of a routed student (the same student with task ids, no router); "
          "set student.router or remove mola_grad")
    if r is None:
        return
    if recipe == "classification":
        check(r.input_size is None, "student.router.input_size",
              "classification routes each image as it is (data.size); input_size is for segmentation, remove it")
        return
    check("mola_grad" not in baselines.run, "baselines.run",
          "mola_grad: a routed segmentation student trains its experts with the true task id, so it is its own "
          "mola_grad (the true-id column of the routing section); remove mola_grad")
    default = Router()
    for name in ("temperature", "top_k", "teacher_forcing"):
        check(getattr(r, name) == getattr(default, name), f"student.router.{name}",
              f"segmentation routes each case once by the router's argmax and trains the experts with the true "
              f"task id; {name} is a classification setting, remove it")


@dataclass
class Evaluate:
    latency_batch: int = 1
    latency_repeats: int = 20


@dataclass
class Export:
    """Formats of every expert beside ``expert.safetensors`` + ``card.json`` (see
    :mod:`lorkd.pipelines.core.export_formats`); each file is reloaded and checked against PyTorch."""

    onnx: bool = False  # expert.onnx (needs `pip install lorkd[onnx]`), checked with ONNX Runtime
    torchscript: bool = False  # expert.torchscript.pt (torch.jit.trace), checked with torch.jit.load
    opset: int | None = None  # ONNX opset (>= 18); None: the exporter's default
    bundle: bool = False  # bundle/: a MONAI bundle (configs/, models/model.pt, docs/), reloaded with MONAI's ConfigParser

    def validate(self, path: str) -> None:
        check(self.opset is None or self.opset >= 18, f"{path}.opset", f"must be an ONNX opset >= 18 (the oldest "
              f"torch.onnx's exporter writes), got {self.opset}")
        if self.onnx:
            require_onnx(f"{path}.onnx")


@dataclass
class Logging:
    """What a run logs besides history.jsonl and the progress lines."""

    tensorboard: bool = False  # TensorBoard scalars in <stage>/tensorboard/ (needs the tensorboard package)


ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require_onnx(key: str = "export.onnx") -> None:
    """Check that the ONNX packages are importable.

    Raises:
        ConfigError: naming ``key``, the missing packages and ``pip install lorkd[onnx]``.
    """
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{key}: ONNX export needs the packages {', '.join(missing)}, not installed here; "
                          f"run `pip install lorkd[onnx]` or set {key}: false")
