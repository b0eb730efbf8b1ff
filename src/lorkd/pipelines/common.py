"""Pieces both recipes use: the distillation objective, saving networks, timing, devices."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..distill import soft_target_kd
from ..engine.trainer import StepLoss
from ..errors import DataError
from ..fileio import read_json, write_atomic, write_json
from .features import FeatureDistiller, check_layer_names, feature_terms
from .runfolder import record_stage, start_training
from .schema import Distill

WEIGHTS, META = "model.safetensors", "model.json"

log = logging.getLogger("lorkd")


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
    try:
        model = build(meta)
    except DataError as err:
        raise DataError(f"{folder / META}: {err}") from err
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
    """Per-task loss ``ce_w * CE + kd_w * T^2 KL(teacher || student) + sum_i w_i * feature term i``.

    Each term is a mean over the task's rows of the global batch (a feature term is computed on
    the task's rows of this rank and rescaled like the others; for ``cka`` that is the CKA of
    this rank's rows, weighted by their share); the total is the mean over the tasks present in
    the global batch, so every task weighs the same whatever its share.

    Args:
        weights: the :class:`~lorkd.pipelines.schema.Distill` weights and temperature.
        teacher: the frozen teacher (kept in eval mode, run under ``no_grad``), or ``None``.
        features: the feature terms (:class:`~lorkd.pipelines.features.FeatureDistiller`), needed
            when ``weights`` has any; ``None`` otherwise.
        world_size: number of DDP ranks.
        task_loss: ``(logits, labels) -> scalar``; cross-entropy by default.
    """

    def __init__(self, weights: Distill, teacher: nn.Module | None = None, features: FeatureDistiller | None = None,
                 world_size: int = 1, task_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        self.weights = weights
        self.teacher = teacher
        self.features = features
        self.world_size = world_size
        self.task_loss = task_loss or nn.functional.cross_entropy
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if weights.uses_teacher and teacher is None:
            raise ValueError("distillation weights are > 0 but no teacher was given")
        if feature_terms(weights) and features is None:
            raise ValueError("feature distillation weights are > 0 but no FeatureDistiller was given")
        self.terms = features.terms if features is not None else []

    def __call__(self, model: nn.Module, batch: Any, global_counts: Tensor) -> StepLoss:
        out = model(batch.images, batch.task_ids)
        w = self.weights
        teacher_out, feats = None, {}
        if self.teacher is not None and w.uses_teacher:
            with torch.no_grad():
                self.teacher.eval()
                teacher_out = self.teacher(batch.images, batch.task_ids)
            if self.features is not None:
                feats = self.features.collect(out, teacher_out)
        present = int((global_counts > 0).sum())
        total = out.features.new_zeros(())
        used = ["ce"] * (w.ce_weight > 0) + ["kd"] * (w.kd_weight > 0) + [t.name for t in self.terms]
        per_task, parts = {}, dict.fromkeys(used, 0.0)
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
            for term in self.terms:
                student_f, teacher_f = feats[term.name]
                terms[term.name] = self.features.loss(term, student_f.index_select(0, rows),
                                                      teacher_f.index_select(0, rows))
                loss = loss + term.weight * scale(terms[term.name])
            total = total + loss / present
            per_task[task] = float(loss.detach())
            for name, value in terms.items():
                parts[name] += float(value.detach()) / len(out.logits)
        return StepLoss(total=total, per_task=per_task, parts=parts)


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
#   fit(model, stage, folder, objective, task_subset=None, extra=None, train_set=None) -> model (best val epoch),
#   meta(model, kind, tasks=None, **extra) -> dict, build(meta) -> MultiTaskNet, select_metric (the
#   key of val_metrics(model) that selects models), train_set (its first item's input probes shapes).


def fit_stage(model: nn.Module, objective: Any, train_set: Any, stage: Any, folder: Path, ctx: Any, *, seed: int,
              num_workers: int, progress: bool, resume: bool, evaluate: Callable[[nn.Module], dict[str, float]],
              select_metric: str, task_names: list[str], sampler_mode: str = "proportional",
              extra: nn.Module | None = None, tensorboard: bool = False) -> nn.Module:
    """Train ``model`` on ``train_set`` with a :class:`TaskBatchSampler` under :func:`fit`; keep
    the epoch with the best ``select_metric`` of ``evaluate`` (``checkpoints/best.pt``).

    ``train_set`` must give each task a contiguous block of indices (``task_sizes``). With
    ``tensorboard``, rank 0 writes each epoch's scalars to ``folder/tensorboard/``."""
    from ..data.multitask import TaskBatchSampler
    from ..engine.checkpoint import load_checkpoint
    from ..engine.scalars import open_tensorboard
    from ..engine.trainer import FitConfig, fit

    sampler = TaskBatchSampler(train_set, stage.batch_size, mode=sampler_mode, seed=seed,
                               num_replicas=ctx.world_size, rank=ctx.rank, drop_last=ctx.is_distributed)
    fit_cfg = FitConfig(epochs=stage.epochs, batch_size=stage.batch_size, optim=stage.optim, seed=seed,
                        checkpoint_every=stage.checkpoint_every, amp=stage.amp, select_metric=select_metric,
                        num_workers=num_workers, progress=progress, stage=folder.name)
    model = model.to(ctx.device)
    if ctx.is_main:
        log.info(f"[{folder.name}] {stage.epochs} epochs x {len(sampler)} steps per epoch "
                 f"(batch {stage.batch_size} per rank x world size {ctx.world_size}; {len(train_set)} training items)")
    scalars = open_tensorboard(folder / "tensorboard") if tensorboard and ctx.is_main else None
    try:
        fit(model, objective, train_set, sampler, fit_cfg, folder, ctx, evaluate=evaluate, extra_modules=extra,
            resume=resume and (folder / "checkpoints" / "latest.pt").is_file(), task_names=task_names,
            scalars=scalars)
    finally:
        if scalars is not None:
            scalars.close()
    best = folder / "checkpoints" / "best.pt"
    if best.is_file():  # the epoch with the best validation score
        model.load_state_dict(load_checkpoint(best)["model"])
    return model


def objective_for(run: Any, distill: Distill, teacher: nn.Module | None = None,
                  features: FeatureDistiller | None = None) -> DistillObjective:
    return DistillObjective(distill, teacher, features, run.ctx.world_size, task_loss=run.task_loss)


def distill_fit(run: Any, model: nn.Module, stage: Any, folder: Path, distill: Distill, teacher: nn.Module | None,
                task_subset: list[int] | None = None) -> nn.Module:
    """Train ``model`` with ``distill``'s losses from ``teacher`` (``run.fit``); the feature terms'
    projectors are built here (a probe forward on the run's first training input) and trained
    with the model as ``extra_modules``; the layer hooks are removed afterwards."""
    features = None
    terms = feature_terms(distill)
    if terms and teacher is not None:
        model = model.to(run.ctx.device)
        features = FeatureDistiller(terms, model, teacher, run.train_set[0][0][None])
    try:
        return run.fit(model, stage, folder, objective_for(run, distill, teacher, features), task_subset=task_subset,
                       extra=features)
    finally:
        if features is not None:
            features.close()


def check_feature_layers(run: Any, teacher: nn.Module | None = None) -> None:
    """Check the layer names of ``student.distill.features`` before anything is trained.

    Without ``teacher``: the student names on a freshly built student, and the teacher names on the
    architecture of ``teacher.net`` when this run will train the teacher. With ``teacher``: the
    teacher names on it (a loaded teacher, before the student is trained).

    Raises:
        ConfigError: naming ``student.distill.features[i].student`` / ``.teacher``.
    """
    sc = run.cfg.student
    pairs = sc.distill.features
    if not pairs:
        return
    if teacher is not None:
        check_layer_names(pairs, teacher=teacher)
        return
    check_layer_names(pairs, student=run.network(sc.net, run.num_classes, sc.experts.as_kwargs()))
    if run.cfg.teacher.source is None and not has_network(run.out / "teacher"):
        check_layer_names(pairs, teacher=run.network(run.cfg.teacher.net, run.num_classes))


def reuse_network(run: Any, folder: Path, tasks: list[int] | None = None,
                  build: Callable[[dict[str, Any]], nn.Module] | None = None) -> nn.Module:
    """Load a network an earlier stage or run saved, after checking it was trained for the
    tasks and classes of this run's data (``tasks``: a subset, by task id). ``build(meta)``
    rebuilds it (default ``run.build``).

    Raises:
        DataError: it was trained on other tasks or another number of classes (names the file).
    """
    model, meta = load_network(folder, build or run.build)
    tasks = list(range(len(run.names))) if tasks is None else tasks
    names, classes = [run.names[t] for t in tasks], [run.num_classes[t] for t in tasks]
    if meta.get("tasks") != names or meta.get("num_classes") != classes:
        raise DataError(f"{folder / META}: trained on tasks {meta.get('tasks')} with classes {meta.get('num_classes')}, "
                        f"but this run's data has tasks {names} with classes {classes}")
    return model.to(run.ctx.device)


def stage_teacher(run: Any) -> nn.Module:
    """Train the foundation model on all tasks, or load ``teacher.source`` (and adapt it, see
    :mod:`lorkd.pipelines.adapt`); writes ``teacher/`` and sets ``run.teacher_info`` (where the
    teacher came from, what was adapted and how long: recorded in ``teacher/model.json``)."""
    from .adapt import build_from_meta, load_source_teacher, teacher_description

    folder = run.out / "teacher"
    tcfg = run.cfg.teacher
    if tcfg.source is not None:
        model = load_source_teacher(run, folder)
    elif has_network(folder):
        model = reuse_network(run, folder, build=lambda meta: build_from_meta(run, meta))
        record_stage(run, "teacher", "reused", folder)
        run.teacher_info = read_json(folder / META).get("teacher_info") or {
            "source": {"kind": "trained", "net": tcfg.net.arch}, "adapt": {"epochs": tcfg.train.epochs}}
    else:
        with timed(run.timing, "teacher"):
            model = run.network(tcfg.net, run.num_classes)
            start_training(run, "teacher", folder)
            objective = objective_for(run, Distill(kd_weight=0.0))
            # a run may give its teacher more training data than its students (data.student_n_train)
            model = run.fit(model, tcfg.train, folder, objective, train_set=getattr(run, "teacher_train_set", None))
        run.teacher_info = {"source": {"kind": "trained", "net": tcfg.net.arch},
                            "adapt": {"mode": "trained on all tasks", "epochs": tcfg.train.epochs,
                                      "seconds": run.timing["teacher"]}}
        run.teacher_info["description"] = teacher_description(run.teacher_info)
        if run.ctx.is_main:
            save_network(model, folder, run.meta(model, "teacher", teacher_info=run.teacher_info))
    run.teacher_info.setdefault("description", teacher_description(run.teacher_info))
    return model


def stage_student(run: Any, teacher: nn.Module, name: str = "student", distill: Distill | None = None) -> nn.Module:
    """Decompose: train the student with experts, distilling from ``teacher``; writes ``<name>/``.

    Without ``distill``: ``student.distill``, or with ``student.distill.search`` the settings the
    search chose on validation (:mod:`lorkd.pipelines.search`)."""
    from .search import search_distill

    folder = run.out / name
    if has_network(folder):
        model = reuse_network(run, folder)
        record_stage(run, name, "reused", folder)
        return model
    sc = run.cfg.student
    if distill is None and sc.distill.search.enabled:
        distill, chosen = search_distill(run, teacher)
        if chosen is not None:  # trained with the full budget: the search's best model is the student
            model = reuse_network(run, chosen)
            if run.ctx.is_main:
                save_network(model, folder, run.meta(model, "student", experts=sc.experts.as_kwargs(),
                                                     search_candidate=chosen.name))
            return model
    distill = distill or sc.distill
    with timed(run.timing, name):
        model = run.network(sc.net, run.num_classes, sc.experts.as_kwargs())
        start_training(run, name, folder)
        model = distill_fit(run, model, sc.train, folder, distill, teacher)
        if run.ctx.is_main:
            save_network(model, folder, run.meta(model, "student", experts=sc.experts.as_kwargs()))
    return model


def stage_baselines(run: Any, teacher: nn.Module, found: bool = False) -> dict[str, Any]:
    """Train the baselines listed in ``baselines.run`` with the student's network and budget;
    ``found``: also reuse the baselines already trained in the run folder though not listed (as
    ``lorkd evaluate`` does after ``lorkd baselines --set baselines.run=...``; logged).

    Returns ``{name: model}`` for ``student_nokd`` and ``{name: {tuple(task ids): model}}`` for
    the others (``stl*``: one model per task; ``mtl*``: one model of all tasks)."""
    from .runfolder import baselines_on_disk
    from .search import search_distill

    sc = run.cfg.student
    trained: dict[str, Any] = {}
    extra = [n for n in baselines_on_disk(run, trained=True) if found and n not in run.cfg.baselines.run]
    if extra and run.ctx.is_main:
        log.info("baselines: %s trained in %s though not in baselines.run: evaluated too", ", ".join(extra),
                 run.out / "baselines")
    for name in [*run.cfg.baselines.run, *extra]:
        kd = name.endswith("_kd")
        chosen = search_distill(run, teacher)[0] if kd and sc.distill.search.enabled else sc.distill
        distill = chosen if kd else sc.distill.without_teacher()
        if name == "student_nokd":
            trained[name] = stage_student(run, teacher, name="baselines/student_nokd", distill=distill)
            continue
        models = {}
        for tasks, folder in baseline_groups(run, name):
            stage = folder.relative_to(run.out).as_posix()
            if has_network(folder):
                models[tuple(tasks)] = reuse_network(run, folder, tasks)
                record_stage(run, stage, "reused", folder)
                continue
            with timed(run.timing, f"baseline_{name}"):
                model = run.network(sc.net, [run.num_classes[t] for t in tasks])
                start_training(run, stage, folder)
                sub_teacher = TaskRemap(teacher, tasks) if kd else None
                model = distill_fit(run, model, sc.train, folder, distill, sub_teacher, task_subset=tasks)
                if run.ctx.is_main:
                    save_network(model, folder, run.meta(model, name, tasks=tasks))
            models[tuple(tasks)] = model
        trained[name] = models
    return trained


def baseline_groups(run: Any, name: str) -> list[tuple[list[int], Path]]:
    """The ``(task ids, folder)`` of each model of baseline ``name`` (``stl*``: one per task;
    ``mtl*``: one of all tasks; ``student_nokd``: the whole student)."""
    if name == "student_nokd":
        return [(list(range(len(run.names))), run.out / "baselines" / name)]
    groups = [[t] for t in range(len(run.names))] if name.startswith("stl") else [list(range(len(run.names)))]
    return [(tasks, run.out / "baselines" / name / (run.names[tasks[0]] if len(tasks) == 1 else "all"))
            for tasks in groups]


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

    @property
    def feature_root(self) -> nn.Module:
        """The wrapped teacher's :attr:`feature_root` (teacher layer names are relative to it)."""
        return getattr(self.teacher, "feature_root", self.teacher)

    def forward(self, x, task_ids):
        out = self.teacher(x, self.map.to(task_ids.device)[task_ids])
        inverse = {int(self.map[i]): i for i in range(len(self.map))}
        out.logits = {inverse[t]: v for t, v in out.logits.items()}
        out.rows = {inverse[t]: v for t, v in out.rows.items()}
        return out


def drive(run: Any, stages: tuple[str, ...], export: Callable[[Any, nn.Module], Any],
          evaluate: Callable[[Any, nn.Module, nn.Module, dict[str, Any]], dict[str, Any]],
          reuse: bool = False) -> dict[str, Any] | None:
    """Run ``stages`` in order on ``run``; earlier stages' outputs are reused when present.

    First :func:`~lorkd.pipelines.runfolder.preflight` (fingerprints of the stages to reuse,
    networks to train, before anything is written; ``reuse`` accepts differing fingerprints).
    Writes ``config.yaml`` (unless a stage was accepted with ``reuse`` although its config
    differs: config.yaml then keeps describing the models in the folder) and ``metrics.json``
    (with ``timing_s``, ``config`` and ``stages``) last. Factories outside the known namespaces
    are accepted only with ``cfg.trust_code``. Returns the metrics when ``evaluate`` ran (on
    rank 0), else ``None``.
    """
    from ..factories import trusted_code

    with trusted_code(getattr(run.cfg, "trust_code", False)):
        return _drive(run, stages, export, evaluate, reuse)


def _drive(run: Any, stages: tuple[str, ...], export: Callable, evaluate: Callable, reuse: bool) -> dict[str, Any] | None:
    from ..config import load_yaml, to_dict, write_config
    from .runfolder import preflight, startup_summary

    out, ctx = run.out, run.ctx
    mismatch = preflight(run, stages, reuse)
    if ctx.is_main:
        log.info(startup_summary(run))
        if not mismatch:
            write_config(out / "config.yaml", run.cfg)
    try:
        check_feature_layers(run)
        teacher = stage_teacher(run)
        check_feature_layers(run, teacher)
        if stages == ("teacher",):
            return None
        student = stage_student(run, teacher) if "student" in stages or has_network(out / "student") else None
        if student is None:
            raise DataError(f"{out / 'student'}: no trained student; run `lorkd decompose` first")
        evaluating = "evaluate" in stages
        baselines = stage_baselines(run, teacher, found=evaluating) if evaluating or "baselines" in stages else {}
        if not ctx.is_main:
            return None
        if "export" in stages or "evaluate" in stages:
            with timed(run.timing, "export"):
                export(run, student)
        if not evaluating:
            if baselines:
                log.info("baselines in %s; `lorkd evaluate` adds them to metrics.json and report.md", out / "baselines")
            return None
        with timed(run.timing, "evaluate"):
            metrics = evaluate(run, teacher, student, baselines)
        metrics["teacher"] = run.teacher_info
        # the first clause (where it came from); the report's "Teacher" line gives all of it
        metrics["models"] = {**metrics.get("models", {}), "teacher": run.teacher_info["description"].split(";")[0]}
        metrics["timing_s"] = _record_timing(out, run.timing)
        if mismatch and (out / "config.yaml").is_file():  # --reuse: the config of the models in the folder
            metrics["config"] = {k: v for k, v in load_yaml(out / "config.yaml").items() if k != "recipe"}
        else:
            metrics["config"] = to_dict(run.cfg)
        metrics["stages"] = run.stage_log
        if mismatch:
            metrics.setdefault("notes", []).append(
                "--reuse: stages were reused although their config differs from this command's; config.yaml and "
                "the Config section describe the models in the folder; see Stages for the differing keys.")
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
