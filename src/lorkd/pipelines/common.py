"""Pieces both recipes use: the distillation objective, saving networks, timing, devices."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..distill import FeatureProjector, feature_kd, soft_target_kd
from ..engine.trainer import StepLoss
from ..errors import DataError
from ..fileio import read_json, write_atomic, write_json
from .schema import Distill

WEIGHTS, META = "model.safetensors", "model.json"


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_network(model: nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (its state dict) and ``model.json`` (``meta``) atomically."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(state, tmp))
    write_json(folder / META, meta)
    return folder


def load_network(folder: Path, build: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network saved by :func:`save_network`: ``build(meta)`` then load the weights.

    Raises:
        DataError: a file is missing or corrupt, or the weights do not fit (names the file).
    """
    meta = read_json(folder / META)
    model = build(meta)
    path = folder / WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the network described in {folder / META}: {err}") from err
    except Exception as err:  # safetensors' own error types for corrupt files
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    return model, meta


def has_network(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / META).is_file()


def global_mean(local_mean: Tensor, local_count: int, global_count: int, world_size: int) -> Tensor:
    """Rescale a task's mean over this rank's rows so that, after DDP averages gradients over
    ``world_size`` ranks, it equals the mean over the task's rows of the *global* batch."""
    return local_mean * (local_count * world_size / global_count)


class DistillObjective:
    """Per-task loss ``ce_w * CE + kd_w * T^2 KL(teacher || student) + feat_w * feature KD``.

    Each term is a mean over the task's rows of the global batch; the total is the mean over
    the tasks present in the global batch, so every task weighs the same whatever its share.

    Args:
        weights: the :class:`~lorkd.pipelines.schema.Distill` weights and temperature.
        teacher: the frozen teacher (kept in eval mode, run under ``no_grad``), or ``None``.
        projector: maps student features to the teacher's width for feature KD, or ``None``.
        world_size: number of DDP ranks.
        dense: segmentation (per-voxel terms, Dice+CE) instead of classification.
    """

    def __init__(self, weights: Distill, teacher: nn.Module | None = None, projector: FeatureProjector | None = None,
                 world_size: int = 1, task_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        self.weights = weights
        self.teacher = teacher
        self.projector = projector
        self.world_size = world_size
        self.task_loss = task_loss or nn.functional.cross_entropy
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        use_teacher = weights.kd_weight > 0 or weights.feat_weight > 0
        if use_teacher and teacher is None:
            raise ValueError("distillation weights are > 0 but no teacher was given")
        if weights.feat_weight > 0 and projector is None:
            raise ValueError("feat_weight > 0 needs a feature projector")

    def __call__(self, model: nn.Module, batch: Any, global_counts: Tensor) -> StepLoss:
        out = model(batch.images, batch.task_ids)
        w = self.weights
        teacher_out = None
        if self.teacher is not None and (w.kd_weight > 0 or w.feat_weight > 0):
            with torch.no_grad():
                self.teacher.eval()
                teacher_out = self.teacher(batch.images, batch.task_ids)
        present = int((global_counts > 0).sum())
        total = out.features.new_zeros(())
        per_task, parts = {}, {"ce": 0.0, "kd": 0.0, "feat": 0.0}
        for task, logits in out.logits.items():
            rows = out.rows[task]
            scale = lambda value: global_mean(value, len(rows), int(global_counts[task]), self.world_size)  # noqa: E731
            loss = out.features.new_zeros(())
            terms = {}
            if w.ce_weight > 0:
                terms["ce"] = self.task_loss(logits, batch.labels.index_select(0, rows))
                loss = loss + w.ce_weight * scale(terms["ce"])
            if teacher_out is not None and w.kd_weight > 0:
                terms["kd"] = soft_target_kd(logits, teacher_out.logits[task], w.temperature)
                loss = loss + w.kd_weight * scale(terms["kd"])
            if teacher_out is not None and w.feat_weight > 0:
                student_f = self.projector(out.features.index_select(0, rows))
                terms["feat"] = feature_kd(student_f, teacher_out.features.index_select(0, rows), w.feat_kind)
                loss = loss + w.feat_weight * scale(terms["feat"])
            total = total + loss / present
            per_task[task] = float(loss.detach())
            for name, value in terms.items():
                parts[name] += float(value.detach()) / len(out.logits)
        return StepLoss(total=total, per_task=per_task, parts={k: v for k, v in parts.items() if k in _used(w)})


def _used(w: Distill) -> set[str]:
    return {name for name, weight in (("ce", w.ce_weight), ("kd", w.kd_weight), ("feat", w.feat_weight)) if weight > 0}


@contextmanager
def timed(timing: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timing[stage]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------- stages
# The stages both recipes share. They work on any ``run`` object that offers (see
# ``classification.Run`` and ``segmentation.Run``):
#   cfg (with teacher, student, baselines), out, ctx, resume, progress, names, num_classes, timing,
#   task_loss (None: cross-entropy), network(net, num_classes, experts=None) -> MultiTaskNet,
#   fit(model, stage, folder, objective, task_subset=None, extra=None) -> model (best val epoch),
#   meta(model, kind, tasks=None, **extra) -> dict, build(meta) -> MultiTaskNet,
#   projector(student, teacher) -> FeatureProjector.


def fit_stage(model: nn.Module, objective: Any, train_set: Any, stage: Any, folder: Path, ctx: Any, *, seed: int,
              num_workers: int, progress: bool, resume: bool, evaluate: Callable[[nn.Module], dict[str, float]],
              select_metric: str, task_names: list[str], sampler_mode: str = "proportional",
              extra: nn.Module | None = None) -> nn.Module:
    """Train ``model`` on ``train_set`` with a :class:`TaskBatchSampler` under :func:`fit`; keep
    the epoch with the best ``select_metric`` of ``evaluate`` (``checkpoints/best.pt``).

    ``train_set`` must give each task a contiguous block of indices (``task_sizes``)."""
    from ..data.multitask import TaskBatchSampler
    from ..engine.checkpoint import load_checkpoint
    from ..engine.trainer import FitConfig, fit

    sampler = TaskBatchSampler(train_set, stage.batch_size, mode=sampler_mode, seed=seed,
                               num_replicas=ctx.world_size, rank=ctx.rank, drop_last=ctx.is_distributed)
    fit_cfg = FitConfig(epochs=stage.epochs, batch_size=stage.batch_size, optim=stage.optim, seed=seed,
                        checkpoint_every=stage.checkpoint_every, amp=stage.amp, select_metric=select_metric,
                        num_workers=num_workers, progress=progress, stage=folder.name)
    model = model.to(ctx.device)
    fit(model, objective, train_set, sampler, fit_cfg, folder, ctx, evaluate=evaluate, extra_modules=extra,
        resume=resume and (folder / "checkpoints" / "latest.pt").is_file(), task_names=task_names)
    best = folder / "checkpoints" / "best.pt"
    if best.is_file():  # the epoch with the best validation score
        model.load_state_dict(load_checkpoint(best)["model"])
    return model


def objective_for(run: Any, distill: Distill, teacher: nn.Module | None = None,
                  projector: FeatureProjector | None = None) -> DistillObjective:
    return DistillObjective(distill, teacher, projector, run.ctx.world_size, task_loss=run.task_loss)


def reuse_network(run: Any, folder: Path, tasks: list[int] | None = None) -> nn.Module:
    """Load a network an earlier stage or run saved, after checking it was trained for the
    tasks and classes of this run's data (``tasks``: a subset, by task id).

    Raises:
        DataError: it was trained on other tasks or another number of classes (names the file).
    """
    model, meta = load_network(folder, run.build)
    tasks = list(range(len(run.names))) if tasks is None else tasks
    names, classes = [run.names[t] for t in tasks], [run.num_classes[t] for t in tasks]
    if meta.get("tasks") != names or meta.get("num_classes") != classes:
        raise DataError(f"{folder / META}: trained on tasks {meta.get('tasks')} with classes {meta.get('num_classes')}, "
                        f"but this run's data has tasks {names} with classes {classes}")
    return model.to(run.ctx.device)


def stage_teacher(run: Any) -> nn.Module:
    """Train the foundation model on all tasks (or load ``teacher.checkpoint``); writes ``teacher/``."""
    folder = run.out / "teacher"
    source = Path(run.cfg.teacher.checkpoint) if run.cfg.teacher.checkpoint else folder
    if has_network(source):
        return reuse_network(run, source)
    if run.cfg.teacher.checkpoint:
        raise DataError(f"teacher.checkpoint {source}: no {WEIGHTS} + {META} there")
    with timed(run.timing, "teacher"):
        model = run.network(run.cfg.teacher.net, run.num_classes)
        objective = objective_for(run, Distill(kd_weight=0.0))
        model = run.fit(model, run.cfg.teacher.train, folder, objective)
        if run.ctx.is_main:
            save_network(model, folder, run.meta(model, "teacher"))
    return model


def stage_student(run: Any, teacher: nn.Module, name: str = "student", distill: Distill | None = None) -> nn.Module:
    """Decompose: train the student with experts, distilling from ``teacher``; writes ``<name>/``."""
    folder = run.out / name
    if has_network(folder):
        return reuse_network(run, folder)
    sc = run.cfg.student
    distill = distill or sc.distill
    with timed(run.timing, name):
        model = run.network(sc.net, run.num_classes, sc.experts.as_kwargs())
        projector = run.projector(model, teacher) if distill.feat_weight > 0 else None
        objective = objective_for(run, distill, teacher, projector)
        model = run.fit(model, sc.train, folder, objective, extra=projector)
        if run.ctx.is_main:
            save_network(model, folder, run.meta(model, "student", experts=sc.experts.as_kwargs()))
    return model


def stage_baselines(run: Any, teacher: nn.Module) -> dict[str, Any]:
    """Train the baselines listed in ``baselines.run`` with the student's network and budget.

    Returns ``{name: model}`` for ``student_nokd`` and ``{name: {tuple(task ids): model}}`` for
    the others (``stl*``: one model per task; ``mtl*``: one model of all tasks)."""
    from dataclasses import replace

    sc = run.cfg.student
    trained: dict[str, Any] = {}
    for name in run.cfg.baselines.run:
        kd = name.endswith("_kd")
        distill = sc.distill if kd else replace(sc.distill, kd_weight=0.0, feat_weight=0.0)
        if name == "student_nokd":
            trained[name] = stage_student(run, teacher, name="baselines/student_nokd", distill=distill)
            continue
        groups = [[t] for t in range(len(run.names))] if name.startswith("stl") else [list(range(len(run.names)))]
        models = {}
        for tasks in groups:
            folder = run.out / "baselines" / name / (run.names[tasks[0]] if len(tasks) == 1 else "all")
            if has_network(folder):
                models[tuple(tasks)] = reuse_network(run, folder, tasks)
                continue
            with timed(run.timing, f"baseline_{name}"):
                model = run.network(sc.net, [run.num_classes[t] for t in tasks])
                sub_teacher = TaskRemap(teacher, tasks) if kd else None
                projector = run.projector(model, teacher) if kd and distill.feat_weight > 0 else None
                objective = objective_for(run, distill, sub_teacher, projector)
                model = run.fit(model, sc.train, folder, objective, task_subset=tasks, extra=projector)
                if run.ctx.is_main:
                    save_network(model, folder, run.meta(model, name, tasks=tasks))
            models[tuple(tasks)] = model
        trained[name] = models
    return trained


def baseline_parameters(baselines: dict[str, Any]) -> dict[str, int]:
    """Parameters of the baseline model that serves one task, per baseline of :func:`stage_baselines`:
    the whole network for ``student_nokd`` and ``mtl*`` (one network for all tasks), the largest
    per-task network for ``stl*``."""
    from ..engine.metrics import count_parameters

    return {name: (count_parameters(models) if isinstance(models, nn.Module)
                   else max(count_parameters(m) for m in models.values()))
            for name, models in baselines.items()}


class TaskRemap(nn.Module):
    """The teacher seen through a subset of its tasks (local id ``i`` -> teacher task ``tasks[i]``)."""

    def __init__(self, teacher: nn.Module, tasks: list[int]) -> None:
        super().__init__()
        self.teacher = teacher
        self.map = torch.tensor(tasks)

    def forward(self, x, task_ids):
        out = self.teacher(x, self.map.to(task_ids.device)[task_ids])
        inverse = {int(self.map[i]): i for i in range(len(self.map))}
        out.logits = {inverse[t]: v for t, v in out.logits.items()}
        out.rows = {inverse[t]: v for t, v in out.rows.items()}
        return out


def drive(run: Any, stages: tuple[str, ...], export: Callable[[Any, nn.Module], Any],
          evaluate: Callable[[Any, nn.Module, nn.Module, dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
    """Run ``stages`` in order on ``run``; earlier stages' outputs are reused when present.

    Writes ``config.yaml`` first and ``metrics.json`` (with ``timing_s`` and ``config``) last.
    Returns the metrics when ``evaluate`` ran (on rank 0), else ``None``.
    """
    from ..config import to_dict, write_config

    out, ctx = run.out, run.ctx
    if ctx.is_main:
        write_config(out / "config.yaml", run.cfg)
    try:
        teacher = stage_teacher(run)
        if stages == ("teacher",):
            return None
        student = stage_student(run, teacher) if "student" in stages or has_network(out / "student") else None
        if student is None:
            raise DataError(f"{out / 'student'}: no trained student; run `lorkd decompose` first")
        baselines = stage_baselines(run, teacher) if "baselines" in stages or "evaluate" in stages else {}
        if not ctx.is_main:
            return None
        if "export" in stages or "evaluate" in stages:
            with timed(run.timing, "export"):
                export(run, student)
        if "evaluate" not in stages:
            return None
        with timed(run.timing, "evaluate"):
            metrics = evaluate(run, teacher, student, baselines)
        metrics["timing_s"] = _record_timing(out, run.timing)
        metrics["config"] = to_dict(run.cfg)
        write_json(out / "metrics.json", metrics)
        return metrics
    finally:
        if ctx.is_main:
            _record_timing(out, run.timing)


def _record_timing(out: Path, timing: dict[str, float]) -> dict[str, float]:
    """Merge this command's stage times into ``out/timing.json`` (stages run by separate
    commands add up there) and return the merged times."""
    from ..fileio import read_json

    path = out / "timing.json"
    merged = {**(read_json(path) if path.is_file() else {}), **timing}
    write_json(path, merged)
    return merged
