"""The baselines stage: the student's network trained without experts (``mtl*``), on one task
alone (``stl*``), without distillation (``student_nokd``) or, beside a routed student, with task ids
and no router (``mola_grad``), with the student's budget."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ...engine.metrics import count_parameters
from ..core.objective import TaskRemap
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import baselines_on_disk, train_or_reuse
from .search import search_distill
from .student import stage_student

log = logging.getLogger("lorkd")


def stage_baselines(run: DecompositionRecipe, teacher: nn.Module, found: bool = False) -> dict[str, Any]:
    """Train the baselines listed in ``baselines.run`` with the student's network and budget;
    ``found``: also reuse the baselines already trained in the run folder though not listed (as
    ``lorkd evaluate`` does after ``lorkd baselines --set baselines.run=...``; logged).

    Returns ``{name: model}`` for ``student_nokd`` and ``mola_grad`` and ``{name: {tuple(task ids): model}}`` for
    the others (``stl*``: one model per task; ``mtl*``: one model of all tasks)."""
    sc = run.cfg.student
    trained: dict[str, Any] = {}
    extra = [n for n in baselines_on_disk(run, trained=True) if found and n not in run.cfg.baselines.run]
    if extra and run.ctx.is_main:
        log.info("baselines: %s trained in %s though not in baselines.run: evaluated too", ", ".join(extra),
                 run.out / "baselines")
    for name in [*run.cfg.baselines.run, *extra]:
        kd = name.endswith("_kd") or name == "mola_grad"  # mola_grad: the student's own losses
        chosen = search_distill(run, teacher)[0] if kd and sc.distill.search.enabled else sc.distill
        distill = chosen if kd else sc.distill.without_teacher()
        if name in ("student_nokd", "mola_grad"):  # a whole student with task ids: without KD, or as the student
            trained[name] = stage_student(run, teacher, name=f"baselines/{name}",
                                          distill=distill, routed=False)
            continue
        models = {}
        for tasks, folder in run.baseline_groups(name):  # the closures below run within the iteration
            def train() -> nn.Module:
                model = run.network(sc.net, [run.num_classes[t] for t in tasks])
                sub_teacher = TaskRemap(teacher, tasks) if kd else None
                return run.distill_fit(model, sc.train, folder, distill, sub_teacher, task_subset=tasks)

            models[tuple(tasks)], _ = train_or_reuse(
                run, folder.relative_to(run.out).as_posix(), folder, train, lambda m, _: run.meta(m, name, tasks=tasks),
                reuse=lambda: run.reuse_network(folder, tasks), timing=f"baseline_{name}")
        trained[name] = models
    return trained


def baseline_parameters(baselines: dict[str, Any]) -> dict[str, int]:
    """Parameters of the baseline model that serves one task, per baseline of :func:`stage_baselines`:
    the whole network for ``student_nokd``, ``mola_grad`` and ``mtl*`` (one network for all tasks), the largest
    per-task network for ``stl*``."""
    return {name: (count_parameters(models) if isinstance(models, nn.Module)
                   else max(count_parameters(m) for m in models.values()))
            for name, models in baselines.items()}
