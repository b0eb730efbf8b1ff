"""``lorkd.decompose``: the whole classification decomposition from Python, on in-memory data and an
in-memory teacher, without YAML or data files.

It runs the classification recipe (:class:`InMemoryClassificationRecipe`, a
:class:`~lorkd.pipelines.recipes.classification.ClassificationRecipe` whose tasks come from memory)
through the same stages as ``lorkd run`` (:func:`~lorkd.pipelines.stages.drive.drive`), so it
writes an ordinary run folder (``config.yaml``, ``teacher/``, ``student/``, ``experts/``,
``metrics.json``, ``report.md``) with its fingerprints and resume rules:

* the config's ``data.tasks`` lists the given tasks as ``{name, path: "memory:<name>@<sha256>"}``,
  the digest of their arrays, so a stage trained on other data is never reused;
* a given teacher is written under ``given_teacher/<sha256 of its weights>/`` and named as
  ``teacher.source``: a lorkd multi-task network as a lorkd teacher folder (``kind: lorkd``), any
  other module as a state dict (``kind: state_dict``) whose architecture is the module itself
  (factory :func:`given_foundation`), wrapped by :class:`~lorkd.models.teacher.Foundation` and
  fitted by the adapt stage as any ``teacher.source``. Another teacher gives another path, so the
  fingerprints of the teacher and student stages differ.
"""

from __future__ import annotations

import copy
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...config import from_dict, to_dict
from ...data.medmnist import ClassificationTask
from ...data.memory import Task, check_tasks
from ...data.multitask import collate_task_batch
from ...engine.checkpoint import prepare_run_dir
from ...engine.distributed import DistributedContext
from ...errors import ConfigError, DataError
from ...experts import ExpertModel, load_expert
from ...experts.adapters import tensors_digest
from ...fileio import write_atomic
from ...models.classifier import MultiTaskClassifier
from ...models.multitask import MultiTaskNet
from ...models.teacher import Foundation
from ...report import load_histories, write_report
from ..core.netio import save_network
from ..core.runtime import resolve_device
from ..schema import ClassificationConfig
from ..stages.drive import drive
from .classification import ClassificationRecipe, cap_tasks, check_spatial_dims

__all__ = ["DecompositionResult", "InMemoryClassificationRecipe", "decompose", "given_foundation"]

GIVEN = "given_teacher"
_FOUNDATIONS: dict[str, nn.Module] = {}  # sha256 -> a foundation module given to decompose in this process


@dataclass
class DecompositionResult:
    """What :func:`decompose` returns.

    Attributes:
        student: the trained LoRKD student (a multi-task classifier: ``student(x, task_ids)`` ->
            ``TaskOutput``; its backbone is an :class:`~lorkd.ExpertModel`), on the CPU, in eval mode.
        experts: ``{task name: plain expert}`` as exported (``experts/<name>``): ``[B, C, *spatial]``
            -> ``[B, num_classes]`` logits, no lorkd module inside; CPU, eval mode.
        metrics: what ``metrics.json`` holds.
        out: the run folder.
    """

    student: MultiTaskClassifier
    experts: dict[str, nn.Module]
    metrics: dict[str, Any]
    out: Path


class InMemoryClassificationRecipe(ClassificationRecipe):
    """The classification recipe on tasks given in memory (checked :class:`ClassificationTask`
    records) instead of the config's files; everything else is the classification recipe's."""

    def __init__(self, cfg: ClassificationConfig, out: Path, ctx: DistributedContext,
                 tasks: list[ClassificationTask], resume: bool = False, progress: bool = True) -> None:
        self.given_tasks = list(tasks)
        super().__init__(cfg, out, ctx, resume, progress)

    def load_tasks(self) -> list[ClassificationTask]:
        """The given tasks, each capped to ``data.max_train`` training images (as files would be)."""
        check_spatial_dims(self.given_tasks, "tasks")
        return cap_tasks(self.cfg, self.given_tasks)


def given_foundation(sha256: str) -> nn.Module:
    """A copy of the foundation module with weights digest ``sha256`` given to :func:`decompose` in
    this process (the factory ``teacher.source`` names for an in-memory foundation model).

    Raises:
        ConfigError: no such module was given in this process (e.g. the run folder is reused by
            ``lorkd evaluate`` later: pass the teacher to ``lorkd.decompose`` again).
    """
    if sha256 not in _FOUNDATIONS:
        raise ConfigError(f"teacher.source: the foundation model {sha256[:16]}... was given in memory to "
                          "lorkd.decompose in another process; call lorkd.decompose(teacher=<the module>, ...) again")
    return copy.deepcopy(_FOUNDATIONS[sha256])


def decompose(teacher: nn.Module | None, tasks: Sequence[Task | ClassificationTask],
              config: ClassificationConfig | Mapping[str, Any] | None = None, out: str | Path | None = None, *,
              resume: bool = False, overwrite: bool = False, reuse: bool = False, progress: bool = False,
              report: bool = True, summary: bool = True) -> DecompositionResult:
    """Decompose ``teacher`` into one low-rank expert per task of ``tasks``: the stages of
    ``lorkd run`` (teacher, adapt, student, baselines, export, evaluate) on in-memory data.

    Args:
        teacher: ``None`` (the run trains one from ``config.teacher.net``), a lorkd multi-task
            network (:class:`~lorkd.models.classifier.MultiTaskClassifier`, one head per task with
            each task's number of classes), or any other ``nn.Module`` taking ``[B, C, *spatial]``:
            a foundation model wrapped by :class:`~lorkd.Foundation` whose task heads the adapt
            stage fits (``config.teacher.features``, ``heads``, ``input`` and ``adapt`` apply as for
            ``teacher.source``). The module itself is not modified.
        tasks: :class:`~lorkd.data.memory.Task` (arrays per split) or
            :class:`~lorkd.data.medmnist.ClassificationTask` records; all 2D or all 3D.
        config: a :class:`~lorkd.pipelines.schema.ClassificationConfig` or a plain mapping of the
            same keys (docs/configuration.md); ``data.tasks`` and ``data.synthetic`` are left out
            (the tasks come from ``tasks``), every other key keeps its default when absent.
        out: the run folder (default: a new temporary folder); as ``lorkd run --out``.
        resume: reuse the finished stages of ``out`` (their fingerprints must match) and resume an
            interrupted one from its last checkpoint.
        overwrite: empty ``out`` first.
        reuse: with ``resume``, reuse finished stages even where their fingerprint differs (as
            ``--reuse``; recorded in the report).
        progress: print the training progress lines.
        report: also write ``report.md`` (and its plots) as ``lorkd run`` does.
        summary: print to stderr what ``lorkd run`` logs (the start-up summary: seed, device,
            threads, tasks and their sizes; each stage's epochs and steps) when the ``lorkd`` logger
            would not show INFO messages anyway (logging not configured); configured logging decides
            otherwise.

    Returns:
        a :class:`DecompositionResult` (student, experts, metrics, run folder).

    Raises:
        DataError: bad tasks (naming the task, split and field), a teacher whose heads do not
            fit the tasks or that fails on their input, a run folder of another run.
        ConfigError: an unknown or invalid config key (naming it), ``data.tasks`` or
            ``data.synthetic`` given, ``teacher.source`` given together with ``teacher``, a
            ``teacher`` that is not an ``nn.Module`` or is a ``Foundation`` already, or an
            existing ``out`` without ``resume``/``overwrite``.
    """
    given = check_tasks(tasks)
    kind = _teacher_kind(teacher)
    digest = tensors_digest(teacher.state_dict()) if teacher is not None else None
    made = out is None
    out = Path(tempfile.mkdtemp(prefix="lorkd-decompose-")) if made else Path(out).expanduser().resolve()
    try:  # every check that needs no run folder, before it is made
        cfg = _config(config, given, [getattr(t, "class_names", None) for t in tasks], out, kind, digest)
        ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=resolve_device(cfg.device))
        recipe = InMemoryClassificationRecipe(cfg, out, ctx, given, resume=resume, progress=progress)
        if kind == "network":
            _check_network_teacher(recipe, teacher)
    except Exception:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    prepare_run_dir(out, overwrite=overwrite, resume=resume)
    if kind == "network":
        _write_network_teacher(recipe, teacher, out / GIVEN / digest[:16])
    elif kind == "foundation":
        _write_foundation(teacher, out / GIVEN / digest[:16] / "foundation.pt")
        _FOUNDATIONS[digest] = teacher
    try:
        with _run_log(summary):
            metrics = drive(recipe, reuse=reuse)
    finally:
        _FOUNDATIONS.pop(digest or "", None)
    if report:
        write_report(out, metrics, metrics["config"], load_histories(out))
    student = recipe.reuse_network(out / "student").cpu().eval()
    experts = {name: load_expert(out / "experts" / name).eval() for name in recipe.names}
    return DecompositionResult(student, experts, metrics, out)


@contextmanager
def _run_log(show: bool) -> Iterator[None]:
    """With ``show``, and the ``lorkd`` logger below INFO (nobody configured logging), its INFO
    messages go to stderr as the CLI prints them (``%(message)s``) for the duration."""
    logger = logging.getLogger("lorkd")
    if not show or logger.getEffectiveLevel() <= logging.INFO:
        yield
        return
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _teacher_kind(teacher: Any) -> str | None:
    """``None``, ``"network"`` (a lorkd multi-task classifier) or ``"foundation"`` (any other module)."""
    if teacher is None:
        return None
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher: expected an nn.Module (or None to train one), got {type(teacher).__name__}")
    if isinstance(teacher, Foundation):
        raise ConfigError("teacher: already a lorkd.Foundation; pass the module it wraps (teacher.feature_root) and "
                          "give its heads and feature layer as config teacher.heads / teacher.features")
    if isinstance(teacher, MultiTaskClassifier):
        return "network"
    if isinstance(teacher, MultiTaskNet):
        raise ConfigError(f"teacher: a {type(teacher).__name__} is not a classifier; give a MultiTaskClassifier "
                          "or a plain foundation module")
    return "foundation"


def _config(config: Any, tasks: list[ClassificationTask], class_names: list[list[str] | None], out: Path,
            kind: str | None, digest: str | None) -> ClassificationConfig:
    """The run's config: ``config`` with ``data.tasks`` naming the given tasks (by their digest) and,
    for a given teacher, ``teacher.source`` naming its files under ``out``; checked by ``from_dict``."""
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, ClassificationConfig):
        data = to_dict(config)
    elif isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
    else:
        raise ConfigError(f"config: expected a ClassificationConfig or a mapping, got {type(config).__name__}")
    recipe = data.pop("recipe", "classification")
    if recipe != "classification":
        raise ConfigError(f"recipe: lorkd.decompose runs the classification recipe, got {recipe!r}")
    section = data.get("data") or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"data: expected a mapping, got {type(section).__name__}")
    if section.get("tasks") or section.get("synthetic") is not None:
        raise ConfigError("data.tasks / data.synthetic: the tasks come from decompose's `tasks` argument; leave "
                          "both out of the config")
    spec = [{"name": t.name, "path": f"memory:{t.name}@{_task_digest(t)[:16]}", "num_classes": t.num_classes,
             "spatial_dims": t.spatial_dims, **({"class_names": list(names)} if names else {})}
            for t, names in zip(tasks, class_names)]
    data["data"] = {**{k: v for k, v in section.items() if k not in ("tasks", "synthetic")}, "tasks": spec}
    if kind is not None:
        teacher = dict(data.get("teacher") or {})
        if teacher.get("source") is not None or teacher.get("checkpoint") is not None:
            raise ConfigError("teacher.source: a teacher module was given to decompose as well; give one of them")
        folder = out / GIVEN / digest[:16]
        teacher["source"] = ({"kind": "lorkd", "path": str(folder)} if kind == "network" else
                             {"kind": "state_dict", "path": str(folder / "foundation.pt"),
                              "factory": f"{__name__}:given_foundation", "kwargs": {"sha256": digest}})
        data["teacher"] = teacher
    return from_dict(ClassificationConfig, data)


def _task_digest(task: ClassificationTask) -> str:
    arrays = {f"{kind}.{s}": torch.from_numpy(np.ascontiguousarray(getattr(task, kind)[s]))
              for kind in ("images", "labels") for s in task.images}
    return tensors_digest(arrays)


def _check_network_teacher(recipe: InMemoryClassificationRecipe, teacher: MultiTaskClassifier) -> None:
    """``teacher`` has one head per task with its classes and runs on the tasks' input.

    Raises:
        DataError: other numbers of classes, or the network fails on the tasks' input (names its shape).
    """
    if list(teacher.num_classes) != recipe.num_classes:
        raise DataError(f"teacher: its heads have classes {teacher.num_classes}, the tasks {recipe.names} have "
                        f"{recipe.num_classes}")
    batch = collate_task_batch([recipe.val_set[i] for i in (0, len(recipe.val_set) - 1)])
    probe = copy.deepcopy(teacher).cpu().eval()
    try:
        with torch.no_grad():
            probe(batch.images, batch.task_ids)
    except Exception as err:  # noqa: BLE001 - any failure of the user's network on this input
        raise DataError(f"teacher: the given {type(teacher).__name__} fails on the tasks' input "
                        f"{list(batch.images.shape)}: {type(err).__name__}: {err}") from err


def _write_network_teacher(recipe: InMemoryClassificationRecipe, teacher: MultiTaskClassifier, folder: Path) -> None:
    """Save ``teacher`` as a lorkd teacher folder (what ``teacher.source: {kind: lorkd}`` reads)."""
    extra = {}
    if isinstance(teacher.backbone, ExpertModel):  # a student used as a teacher
        c = teacher.backbone.config.to_json()
        extra["experts"] = {k: c[k] for k in ("rank", "alpha", "norm", "targets")}
    save_network(teacher, folder, recipe.meta(teacher, "teacher", **extra))


def _write_foundation(module: nn.Module, path: Path) -> None:
    """The module's state dict as a ``torch.save`` file (read back with ``weights_only=True``)."""
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    write_atomic(path, lambda tmp: torch.save(state, tmp))

