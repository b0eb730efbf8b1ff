"""Run-folder integrity for both recipes: checks before anything trains, and what each stage did.

:func:`preflight` runs before the first stage and before anything is written:

* every stage folder this command would reuse or resume must carry the fingerprint of the
  current config (:mod:`lorkd.pipelines.core.fingerprint`), or the command is refused with the
  differing keys listed, unless ``reuse`` (``--reuse``) accepts them;
* every network this command will train is built and run once on an input of the run's size,
  so a typo in ``arch`` or an input smaller than the backbone's minimum fails here with a
  one-line hint instead of a traceback after training has started;
* ``logging.tensorboard: true`` needs the ``tensorboard`` package.

Stages then train or reuse their networks with :func:`train_or_reuse` (or its halves,
:func:`reuse_stage` and :func:`train_stage`), which call :func:`start_training` (writes the
fingerprint) or :func:`record_stage`; the list (``recipe.state.stage_log``) goes into
``metrics.json`` as ``stages`` and into the report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...engine.scalars import tensorboard_writer_class
from ...errors import ConfigError
from ..schema import BASELINES, Net
from .fingerprint import compare, write_fingerprint
from .netio import has_network, save_network
from .recipe import DecompositionRecipe, Recipe
from .runtime import timed

log = logging.getLogger("lorkd")


def stage_folders(run: DecompositionRecipe) -> list[tuple[str, Path]]:
    """``(stage, folder)`` of every network stage of the run's config, in training order, and of
    baselines found in the folder though no longer configured (config.yaml must fit them too)."""
    out = [("student", run.out / "student")]
    source = run.cfg.teacher.source
    if isinstance(source, list):  # an ensemble: teacher/ and each member adapted in teacher/members/<i>
        members = [(f"teacher/members/{i}", run.out / "teacher" / "members" / str(i)) for i in range(len(source))]
        out[:0] = [("teacher", run.out / "teacher"), *members]
    elif source is None or source.kind != "lorkd":  # a lorkd source is another run's folder
        out.insert(0, ("teacher", run.out / "teacher"))
    if run.cfg.student.distill.search.enabled:  # the candidates of student.distill.search found so far
        out[-1:-1] = [(f"search/{f.name}", f) for f in sorted((run.out / "search").glob("c*")) if f.is_dir()]
    for name in dict.fromkeys([*run.cfg.baselines.run, *baselines_on_disk(run)]):
        out += [(folder.relative_to(run.out).as_posix(), folder) for _, folder in run.baseline_groups(name)]
    return out


def baselines_on_disk(run: DecompositionRecipe, trained: bool = False) -> list[str]:
    """Names of the baselines with a folder in ``run.out/baselines`` (sorted); ``trained``: only
    those whose every model is saved (``model.safetensors``)."""
    root = run.out / "baselines"
    names = sorted(p.name for p in root.iterdir() if p.name in BASELINES) if root.is_dir() else []
    return [n for n in names if not trained or all(has_network(f) for _, f in run.baseline_groups(n))]


def _has_output(folder: Path) -> bool:
    return has_network(folder) or (folder / "checkpoints" / "latest.pt").is_file()


def check_fingerprints(run: DecompositionRecipe, reuse: bool) -> dict[str, list[str]]:
    """``{stage: [differences]}`` of the stage folders whose recorded config differs from
    ``run.cfg`` (a folder without a fingerprint counts as differing).

    Raises:
        ConfigError: some differ and ``reuse`` is false; the message lists ``key: old -> new``.
    """
    found: dict[str, list[str]] = {}
    for stage, folder in stage_folders(run):
        if not _has_output(folder):
            continue
        diffs = compare(folder, stage, run.cfg, run.state.fingerprint_extra)
        if diffs is None:
            found[stage] = ["no fingerprint.json (made by an older lorkd or by hand): its config is unknown"]
        elif diffs:
            found[stage] = diffs
    if found and not reuse:
        lines = [f"  {stage} ({run.out / stage}): " + "; ".join(d) for stage, d in found.items()]
        raise ConfigError(f"{run.out}: the trained stages in this folder were made with another config:\n"
                          + "\n".join(lines) + "\npass --reuse to use them anyway (recorded in the report), "
                          "--overwrite to retrain, or another --out")
    return found


def will_train(run: DecompositionRecipe, stages: tuple[str, ...]) -> list[tuple[str, Net]]:
    """``(config key, Net)`` of the networks this command trains (teacher, student/baselines)."""
    nets = []
    if run.cfg.teacher.source is None and not has_network(run.out / "teacher"):
        nets.append(("teacher.net", run.cfg.teacher.net))
    student = "student" in stages and not has_network(run.out / "student")
    baselines = ("baselines" in stages or "evaluate" in stages) and any(
        not has_network(folder) for stage, folder in stage_folders(run) if stage.startswith("baselines/"))
    if student or baselines:
        nets.append(("student.net", run.cfg.student.net))
    return nets


def check_input_size(run: DecompositionRecipe, key: str, net: Net) -> None:
    """Build ``net`` and run it (eval mode, no grad) on zeros shaped like a training input.

    Raises:
        ConfigError: the network cannot be built (names ``key.arch`` or ``key``) or fails on the
            run's input size (a one-line hint with the smallest size that works, when one is found).
    """
    try:
        model = run.network(net, run.num_classes)
    except ConfigError as err:
        raise ConfigError(f"{key}.arch: {err}") from err
    except (TypeError, ValueError, RuntimeError) as err:  # the network's own constructor refused its arguments
        raise ConfigError(f"{key}: cannot build {net.arch!r} with these settings ({type(err).__name__}: "
                          f"{' '.join(str(err).split())}); check {key}.kwargs") from err
    shape = tuple(run.train_set[0][0].shape)  # [C, *spatial]
    failure = _failure(model, shape)
    if failure is None:
        return
    spatial = shape[1:]
    for factor in (2, 3, 4, 6, 8, 12, 16):
        bigger, wanted = run.larger_input(spatial, factor)
        if _failure(model, (shape[0], *bigger)) is None:
            raise ConfigError(f"{key}.arch {net.arch!r} does not run on inputs of {list(spatial)} px (too small "
                              f"for it); set {run.size_key} to at least {wanted}")
    raise ConfigError(f"{key}.arch {net.arch!r} does not run on the run's inputs [C, *spatial] = {list(shape)}, "
                      f"nor on larger ones ({failure}); check {key}.kwargs or choose another {key}.arch")


def _failure(model: torch.nn.Module, shape: tuple[int, ...]) -> str | None:
    """``None`` when ``model`` runs on zeros ``[2, *shape]`` (eval mode, no grad), else the error's first line."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long))
        return None
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        model.train(was)


def check_tensorboard(run: Recipe) -> None:
    """``logging.tensorboard: true`` needs ``torch.utils.tensorboard`` (the tensorboard package)."""
    cfg = getattr(run.cfg, "logging", None)  # a transfer config has no logging section
    if cfg is not None and cfg.tensorboard:
        tensorboard_writer_class()  # raises ConfigError naming logging.tensorboard


def preflight(run: DecompositionRecipe, stages: tuple[str, ...], reuse: bool) -> dict[str, list[str]]:
    """All checks before the first stage (see module docstring); returns the accepted differences."""
    run.state.stage_log, run.state.reuse = [], reuse
    run.state.mismatch = check_fingerprints(run, reuse)
    check_tensorboard(run)
    state = torch.random.get_rng_state()  # building networks seeds the global RNG: leave it as it was
    try:
        for key, net in will_train(run, stages):
            check_input_size(run, key, net)
    finally:
        torch.random.set_rng_state(state)
    return run.state.mismatch


def record_stage(run: Recipe, stage: str, status: str, folder: Path) -> None:
    """Note what ``stage`` did in this command: ``trained``, ``resumed``, ``reused`` or ``loaded``;
    all but ``trained`` (whose progress shows) also log one line saying so (rank 0)."""
    entry: dict[str, Any] = {"stage": stage, "status": status, "folder": str(folder)}
    diffs = run.state.mismatch.get(stage)
    if status == "reused" and diffs:
        entry.update(status="reused with --reuse", config_differs=diffs)
    run.state.stage_log.append(entry)
    if status != "trained" and run.ctx.is_main:
        where = {"resumed": f"from {Path(folder) / 'checkpoints' / 'latest.pt'}", "loaded": f"from {folder}",
                 "reused": f"from {folder}" + (f" though its config differs ({'; '.join(diffs)})" if diffs else
                                               " (trained earlier with the same config)")}[status]
        log.info("%s: %s %s", stage, status, where)


def start_training(run: Recipe, stage: str, folder: Path) -> None:
    """Called as ``stage`` starts (or resumes) training: writes its fingerprint (rank 0) and records it."""
    resumed = run.resume and (folder / "checkpoints" / "latest.pt").is_file()
    if run.ctx.is_main:
        write_fingerprint(folder, stage, run.cfg, run.state.fingerprint_extra)
    record_stage(run, stage, "resumed" if resumed else "trained", folder)



def reuse_stage(run: Recipe, stage: str, folder: Path, reuse: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The network ``folder`` holds, finished earlier: ``reuse()`` (default ``run.reuse_network(folder)``),
    recorded as ``reused``."""
    model = reuse() if reuse is not None else run.reuse_network(folder)
    record_stage(run, stage, "reused", folder)
    return model


def train_stage(run: Recipe, stage: str, folder: Path, train: Callable[[], nn.Module],
                meta: Callable[[nn.Module, float], dict[str, Any]], timing: str | None = None,
                saves: Callable[[nn.Module], nn.Module] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``stage`` into ``folder``: :func:`start_training` (fingerprint, stage log), then ``train()``
    (builds and fits the network; resumes from ``checkpoints/latest.pt`` when the run resumes), both
    timed into ``run.state.timing[timing or stage]``; then rank 0 saves the network (``saves(model)``:
    what of it is saved, default all) with ``meta(model, seconds)`` as ``model.json``.

    Returns ``(model, meta)``: the trained model and its ``model.json`` (computed on every rank)."""
    timing_log: dict[str, float] = {}
    with timed(timing_log, stage):
        start_training(run, stage, folder)
        model = train()
    seconds = timing_log[stage]
    key = timing or stage
    run.state.timing[key] = run.state.timing.get(key, 0.0) + seconds
    info = meta(model, seconds)
    if run.ctx.is_main:
        save_network(saves(model) if saves is not None else model, folder, info)
    return model, info


def train_or_reuse(run: Recipe, stage: str, folder: Path, train: Callable[[], nn.Module],
                   meta: Callable[[nn.Module, float], dict[str, Any]], reuse: Callable[[], nn.Module] | None = None,
                   timing: str | None = None,
                   saves: Callable[[nn.Module], nn.Module] | None = None) -> tuple[nn.Module, dict[str, Any] | None]:
    """The network of ``stage``: :func:`reuse_stage` when ``folder`` holds it (``model.safetensors`` +
    ``model.json``), else :func:`train_stage`. Returns ``(model, meta)``, ``meta`` ``None`` when reused.

    Raises:
        DataError: the saved network was trained for other tasks or classes (from ``reuse``).
    """
    if has_network(folder):
        return reuse_stage(run, stage, folder, reuse), None
    return train_stage(run, stage, folder, train, meta, timing, saves)

def runtime_line(ctx: Any, seeds: str, out: Path) -> str:
    """The first line of a start-up summary: ``seeds`` (e.g. ``"seed 0"``), device, torch threads,
    ``OMP_NUM_THREADS``, world size of ``ctx`` (a DistributedContext) and the output folder."""
    return (f"lorkd: {seeds}, device {ctx.device}, {torch.get_num_threads()} torch threads "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), world size {ctx.world_size}, out {out}")


def startup_summary(run: DecompositionRecipe) -> str:
    """One block of text: seed, device, threads, world size, the data found per task and split (and
    the teacher's training images, when it trains on more than the students)."""
    lines = [runtime_line(run.ctx, f"seed {run.cfg.seed}", run.out)]
    teacher_set = run.teacher_train_data()
    for t, (task, name) in enumerate(zip(run.tasks, run.names)):
        n = run.task_counts(t)
        counts = [f"{s} {n[s]}" for s in ("train", "val", "test")]
        if teacher_set is not run.train_set:
            counts[0] += f" (teacher {teacher_set.task_sizes[t]})"
        source = getattr(task, "source", None) or getattr(task, "root", "")
        lines.append(f"  task {name}: {', '.join(counts)} ({run.count_unit}; {run.num_classes[t]} classes; {source})")
    return "\n".join(lines)
