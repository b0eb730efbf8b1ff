"""The recipe protocol: what a recipe provides to the generic stages, and the run's typed state.

A **recipe** is one kind of run (classification, segmentation, transfer). Its object holds the
config, the run folder, the distributed context, the tasks and their datasets, and answers the
questions the generic code asks:

* :class:`Recipe` (every recipe): the data (:meth:`~Recipe.train_data`, :meth:`~Recipe.dataset`),
  the task loss, scoring a model (:meth:`~Recipe.score`, :meth:`~Recipe.val_metrics`) and training
  one network with selection on validation (:meth:`~Recipe.fit`, the same for all).
* :class:`DecompositionRecipe` (classification, segmentation): adds the networks (teacher, student,
  baselines: :meth:`~DecompositionRecipe.network`, :meth:`~DecompositionRecipe.build`,
  :meth:`~DecompositionRecipe.meta`), the expert card and export input, and the recipe's part of
  the metrics (:meth:`~DecompositionRecipe.summary`). The stages of :mod:`lorkd.pipelines.stages`
  (teacher, adapt, student, search, baselines, export, evaluate) are generic code over it.

What the stages record while they run lives in :class:`RunState` (``recipe.state``), not in
attributes added from outside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from ...engine.distributed import DistributedContext
from ...errors import ConfigError, DataError
from ...fileio import read_json
from ..schema import Distill, Net, Stage
from .features import FeatureDistiller, feature_terms
from .netio import META, load_network
from .objective import DistillObjective, TaskRemap
from .routing import RoutedObjective, RouterTraining
from .training import fit_stage

STAGES = ("teacher", "student", "baselines", "export", "evaluate")


@dataclass
class RunState:
    """What one command's stages record as they go.

    Attributes:
        timing: seconds per stage (``metrics.json`` ``timing_s``).
        stage_log: per stage: ``{"stage", "status", "folder"[, "config_differs"]}``.
        mismatch: ``{stage: [differences]}`` of reused stages whose config differs (``--reuse``).
        reuse: ``--reuse`` was given.
        teacher_info: where the teacher came from, what was adapted and how long.
        search_result: the distillation settings ``student.distill.search`` chose, and the folder of
            the chosen candidate when it is the student (``None`` before the search ran).
        fingerprint_extra: dotted keys the stage fingerprints add to the config's, derived from it
            (``data.selection``: the digest of a ``data.select`` subset; see ``core.fingerprint``).
    """

    timing: dict[str, float] = field(default_factory=dict)
    stage_log: list[dict[str, Any]] = field(default_factory=list)
    mismatch: dict[str, list[str]] = field(default_factory=dict)
    reuse: bool = False
    teacher_info: dict[str, Any] = field(default_factory=dict)
    search_result: tuple[Distill, Path | None] | None = None
    fingerprint_extra: dict[str, Any] = field(default_factory=dict)


class Recipe(ABC):
    """The data, loss, scoring and training of a run (see the module docstring).

    Subclasses set in ``__init__``: ``tasks`` (the recipe's task records), ``names``,
    ``num_classes``, ``channels``, ``spatial_dims``, ``train_set``, ``val_set``, ``test_set``.

    Class attributes:
        kind: the recipe's name (``metrics.json`` ``task_kind``).
        select_metric: the key of :meth:`val_metrics` that selects models (higher is better).
        val_keys: the keys :meth:`val_metrics` averages over the tasks.
        task_loss: ``(logits, labels) -> scalar`` (cross-entropy unless overridden).
    """

    kind: ClassVar[str]
    select_metric: ClassVar[str]
    val_keys: ClassVar[tuple[str, ...]]
    task_loss: Callable[[Tensor, Tensor], Tensor] = staticmethod(F.cross_entropy)

    tasks: list[Any]
    names: list[str]
    num_classes: list[int]
    channels: int
    spatial_dims: int
    train_set: Any
    val_set: Any
    test_set: Any

    def __init__(self, cfg: Any, out: Path, ctx: DistributedContext, resume: bool = False, progress: bool = True,
                 seed: int | None = None) -> None:
        self.cfg, self.out, self.ctx, self.resume, self.progress = cfg, Path(out), ctx, resume, progress
        self.seed = cfg.seed if seed is None else seed
        self.state = RunState()

    # ---- data
    @abstractmethod
    def train_data(self, tasks: list[int] | None = None) -> Any:
        """Training data of all tasks, or of ``tasks`` only (task ids then index that list); each
        task a contiguous block of indices (``task_sizes``), as :class:`TaskBatchSampler` needs."""

    @abstractmethod
    def dataset(self, split: str, tasks: list[int] | None = None) -> Any:
        """The ``"val"`` or ``"test"`` data of all tasks (``val_set``/``test_set``) or of ``tasks`` only."""

    @abstractmethod
    def task_counts(self, t: int) -> dict[str, int]:
        """Items of task ``t`` per split (``train``, ``val``, ``test``) for the start-up summary."""

    count_unit: ClassVar[str] = "images"

    # ---- scoring
    @abstractmethod
    def score(self, model: nn.Module, data: Any, tasks: list[int] | None = None,
              keep: dict[int, dict[str, np.ndarray]] | None = None, final: bool = False) -> dict[int, dict[str, float]]:
        """``{task: {metric: value}}`` of ``model`` on ``data`` (a multi-task network: every task of
        ``data`` or ``tasks``; a plain one: ``tasks`` is its one task). ``keep[task]`` receives the
        per-item outputs the bootstrap needs; ``final``: the test read of the evaluate stage (the
        metrics reported, e.g. HD95, not only the selection metric)."""

    @staticmethod
    def average(values: list[float]) -> float:
        """The mean of a validation metric over the tasks."""
        return float(np.mean(values))

    def val_metrics(self, model: nn.Module, tasks: list[int] | None = None) -> dict[str, float]:
        """The ``val_keys`` averaged over ``tasks`` (default all), and ``<select_metric>_<task>`` per task."""
        per_task = self.score(model, self.dataset("val", tasks))
        names = self.names if tasks is None else [self.names[t] for t in tasks]
        out = {key: self.average([m[key] for m in per_task.values()]) for key in self.val_keys}
        out.update({f"{self.select_metric}_{names[t]}": m[self.select_metric] for t, m in per_task.items()})
        return out

    # ---- training
    def fit(self, model: nn.Module, stage: Stage, folder: Path, objective: Any, task_subset: list[int] | None = None,
            extra: nn.Module | None = None, train_set: Any = None,
            evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> nn.Module:
        """Train ``model`` on ``train_set`` (default: :meth:`train_data` of ``task_subset``); keep the
        epoch with the best validation ``select_metric`` (over ``task_subset``) of ``evaluate``
        (default :meth:`val_metrics`)."""
        train = self.train_data(task_subset) if train_set is None else train_set
        ids = range(len(self.names)) if task_subset is None else task_subset
        logging_cfg = getattr(self.cfg, "logging", None)
        return fit_stage(model, objective, train, stage, folder, self.ctx, seed=self.seed,
                         num_workers=self.cfg.num_workers, progress=self.progress, resume=self.resume,
                         evaluate=evaluate or (lambda m: self.val_metrics(m, task_subset)),
                         select_metric=self.select_metric,
                         task_names=[self.names[t] for t in ids], sampler_mode=self.sampler_mode, extra=extra,
                         tensorboard=bool(logging_cfg and logging_cfg.tensorboard))

    @property
    def sampler_mode(self) -> str:
        """How :class:`TaskBatchSampler` mixes the tasks (``data.sampler``)."""
        return getattr(self.cfg.data, "sampler", "proportional")


class DecompositionRecipe(Recipe):
    """A recipe the decomposition stages run on: teacher -> student -> baselines -> export -> evaluate.

    Class attributes (besides :class:`Recipe`'s):
        dense: per-pixel outputs (segmentation; exported with dynamic spatial axes).
        size_key: the config key of the input size (what a too-small input's error names).
        model_descriptions: one line per model name, for the report.
    """

    dense: ClassVar[bool] = False
    size_key: ClassVar[str]
    model_descriptions: ClassVar[dict[str, str]]
    stages: ClassVar[tuple[str, ...]] = STAGES

    # ---- networks
    @abstractmethod
    def spec(self, net: Net) -> dict[str, Any]:
        """The backbone spec of ``net`` for this run's input (what :func:`lorkd.build_architecture` builds)."""

    @abstractmethod
    def network(self, net: Net, num_classes: list[int], experts: dict[str, Any] | None = None) -> nn.Module:
        """A fresh multi-task network (seeded with ``cfg.seed``); with ``experts``, a LoRKD student."""

    @staticmethod
    @abstractmethod
    def build(meta: dict[str, Any]) -> nn.Module:
        """Rebuild a saved network from its ``model.json``."""

    @abstractmethod
    def meta(self, model: nn.Module, kind: str, tasks: list[int] | None = None, **extra: Any) -> dict[str, Any]:
        """What ``model.json`` records of a network (``tasks``: the task ids it serves)."""

    @abstractmethod
    def larger_input(self, spatial: tuple[int, ...], factor: int) -> tuple[tuple[int, ...], Any]:
        """``spatial`` enlarged ``factor`` times as the recipe would accept it, and the value of
        ``size_key`` that gives it (the hint of a too-small input)."""

    def teacher_train_data(self) -> Any:
        """What a teacher the run trains sees (default: :meth:`train_data` of every task)."""
        return self.train_set

    # ---- export and evaluation
    @abstractmethod
    def expert_card(self, t: int) -> dict[str, Any]:
        """The ``card.json`` of task ``t``'s exported expert: what ``lorkd predict`` needs."""

    @abstractmethod
    def export_input_shape(self, t: int) -> tuple[int, ...]:
        """``[C, *spatial]`` of an input of task ``t``'s expert (traced by the ONNX/TorchScript export)."""

    @abstractmethod
    def summary(self, teacher: nn.Module, student: nn.Module, results: dict[str, Any]) -> dict[str, Any]:
        """The recipe's part of ``metrics.json`` around ``results`` (``{"val"|"test": {task: {model:
        metrics}}}``): metric keys, sizes, FLOPs, latency, data, model descriptions, notes."""

    # ---- what the stages share
    def objective(self, distill: Distill, teacher: nn.Module | None = None,
                  features: FeatureDistiller | None = None, stage: Stage | None = None) -> DistillObjective:
        """The loss of a stage trained with ``distill`` (its ``label_smoothing`` from ``stage``)."""
        return DistillObjective(distill, teacher, features, self.ctx.world_size, task_loss=self.stage_task_loss(stage))

    def stage_task_loss(self, stage: Stage | None) -> Callable[[Tensor, Tensor], Tensor]:
        """:attr:`task_loss`, with ``stage.label_smoothing`` applied (cross-entropy only).

        Raises:
            ConfigError: label smoothing asked of a recipe whose task loss is not cross-entropy.
        """
        smoothing = stage.label_smoothing if stage is not None else 0.0
        if smoothing == 0:
            return self.task_loss
        if self.task_loss is not F.cross_entropy:
            raise ConfigError(f"label_smoothing: {smoothing} is for the cross-entropy of classification; the "
                              f"{self.kind} recipe trains with another loss (set it to 0)")
        return partial(F.cross_entropy, label_smoothing=smoothing)

    def distill_fit(self, model: nn.Module, stage: Stage, folder: Path, distill: Distill, teacher: nn.Module | None,
                    task_subset: list[int] | None = None, router: RouterTraining | None = None) -> nn.Module:
        """Train ``model`` with ``distill``'s losses from ``teacher`` (:meth:`fit`); the feature terms'
        projectors are built here (a probe forward on the first training input) and trained with
        the model as ``extra_modules``; the layer hooks are removed afterwards.

        With ``router``: a routed student (:mod:`lorkd.pipelines.core.routing`), the router trained
        alongside (left at the best epoch's weights) and the epochs selected on the routed
        validation accuracy (:meth:`routed_val_metrics`)."""
        features = None
        if feature_terms(distill) and teacher is not None:
            model = model.to(self.ctx.device)
            features = FeatureDistiller(feature_terms(distill), model, teacher, self.train_set[0][0][None])
        try:
            if router is None:
                return self.fit(model, stage, folder, self.objective(distill, teacher, features, stage),
                                task_subset=task_subset, extra=features)
            objective = RoutedObjective(distill, router, teacher, features, self.ctx.world_size,
                                        self.stage_task_loss(stage))
            extra = nn.ModuleDict({"router": router, **({"features": features} if features is not None else {})})
            return self.fit(model, stage, folder, objective, extra=extra,
                            evaluate=lambda m: self.routed_val_metrics(m, router.router))
        finally:
            if features is not None:
                features.close()

    def routed_val_metrics(self, model: nn.Module, router: nn.Module) -> dict[str, float]:
        """Validation metrics of ``model`` routed by ``router`` (no task id); ``select_metric`` is the
        routed one. Recipes that route override it (classification).

        Raises:
            ConfigError: this recipe does not route (names ``student.router``)."""
        raise ConfigError(f"student.router: the {self.kind} recipe does not route without a task id")

    route_in_training: ClassVar[bool] = True  # experts trained on the router's routes after teacher forcing

    def router_input_shape(self) -> tuple[int, ...]:
        """``[C, *spatial]`` of one router input (default: an expert's input, :meth:`export_input_shape`)."""
        return self.export_input_shape(0)

    def router_views(self) -> Callable[[Tensor, int], Tensor] | None:
        """``(task_ids, step) -> router input rows`` in training, or ``None``: the batch's images."""
        return None

    def routed_card(self) -> dict[str, Any]:
        """Keys the recipe adds to ``routed/routed.json`` (what a routed predict needs)."""
        return {}

    def routing_summary(self, model: nn.Module, router: nn.Module,
                        outputs: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict[str, Any]:
        """``metrics.json`` ``routing``: ``model`` routed by ``router`` on test, beside the per-item
        test ``outputs`` of the models scored with the task id. Recipes that route override it.

        Raises:
            ConfigError: this recipe does not route (names ``student.router``)."""
        raise ConfigError(f"student.router: the {self.kind} recipe does not route without a task id")

    def reuse_network(self, folder: Path, tasks: list[int] | None = None,
                      build: Callable[[dict[str, Any]], nn.Module] | None = None) -> nn.Module:
        """Load a network an earlier stage or run saved, after checking it was trained for the
        tasks and classes of this run's data (``tasks``: a subset, by task id). ``build(meta)``
        rebuilds it (default :meth:`build`). A multi-task network gets those tasks' names
        (``task_names``: its adapters and summary are named by them).

        Raises:
            DataError: it was trained on other tasks or another number of classes (names the file).
        """
        model, meta = load_network(folder, build or self.build)
        tasks = list(range(len(self.names))) if tasks is None else tasks
        names, classes = [self.names[t] for t in tasks], [self.num_classes[t] for t in tasks]
        if meta.get("tasks") != names or meta.get("num_classes") != classes:
            raise DataError(f"{folder / META}: trained on tasks {meta.get('tasks')} with classes "
                            f"{meta.get('num_classes')}, but this run's data has tasks {names} with classes {classes}")
        if hasattr(model, "task_names"):
            model.task_names = names
        return model.to(self.ctx.device)

    def reuse_teacher(self, folder: Path, build: Callable[[dict[str, Any]], nn.Module] | None = None) -> nn.Module:
        """A teacher network saved by an earlier run (:meth:`reuse_network`), which may have been
        trained on *more* tasks than this run: then it is seen through this run's tasks, picked by
        name (:class:`~lorkd.pipelines.core.objective.TaskRemap`; its other heads stay unused).

        Raises:
            DataError: one of this run's tasks is not among its tasks, or has another number of
                classes there (names the file).
        """
        saved = read_json(folder / META)
        theirs, their_classes = list(saved.get("tasks") or []), list(saved.get("num_classes") or [])
        if theirs == self.names:
            return self.reuse_network(folder, build=build)
        missing = [n for n in self.names if n not in theirs]
        wrong = [f"{n} ({their_classes[theirs.index(n)]} classes there, {c} here)"
                 for n, c in zip(self.names, self.num_classes) if n in theirs and their_classes[theirs.index(n)] != c]
        if missing or wrong:
            raise DataError(f"{folder / META}: trained on tasks {theirs} with classes {their_classes}; this run's "
                            + (f"tasks {missing} are not among them" if missing else f"tasks differ: {', '.join(wrong)}"))
        if saved.get("channels") not in (None, self.channels):
            raise DataError(f"{folder / META}: trained on {saved['channels']}-channel input, this run's data has "
                            f"{self.channels} channel(s) (set data.channels: {saved['channels']})")
        model, _ = load_network(folder, build or self.build)
        return TaskRemap(model, self.task_positions(theirs)).to(self.ctx.device)

    def task_positions(self, theirs: list[str]) -> list[int]:
        """Where each of this run's tasks stands in ``theirs`` (a teacher's task names, a superset)."""
        return [theirs.index(n) for n in self.names]

    def baseline_groups(self, name: str) -> list[tuple[list[int], Path]]:
        """The ``(task ids, folder)`` of each model of baseline ``name`` (``stl*``: one per task;
        ``mtl*``: one of all tasks; ``student_nokd``, ``mola_grad``: the whole student)."""
        every = list(range(len(self.names)))
        if name in ("student_nokd", "mola_grad"):
            return [(every, self.out / "baselines" / name)]
        groups = [[t] for t in every] if name.startswith("stl") else [every]
        return [(tasks, self.out / "baselines" / name / (self.names[tasks[0]] if len(tasks) == 1 else "all"))
                for tasks in groups]
