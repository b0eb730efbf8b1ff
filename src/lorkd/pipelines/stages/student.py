"""The student stage: decompose the teacher into a LoRKD student (one low-rank expert per task)."""

from __future__ import annotations

from torch import nn

from ..core.features import check_layer_names
from ..core.netio import has_network, save_network
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import record_stage, start_training
from ..core.runtime import timed
from ..schema import Distill
from .search import search_distill


def check_feature_layers(run: DecompositionRecipe, teacher: nn.Module | None = None) -> None:
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


def stage_student(run: DecompositionRecipe, teacher: nn.Module, name: str = "student",
                  distill: Distill | None = None) -> nn.Module:
    """Decompose: train the student with experts, distilling from ``teacher``; writes ``<name>/``.

    Without ``distill``: ``student.distill``, or with ``student.distill.search`` the settings the
    search chose on validation (:mod:`lorkd.pipelines.stages.search`)."""
    folder = run.out / name
    if has_network(folder):
        model = run.reuse_network(folder)
        record_stage(run, name, "reused", folder)
        return model
    sc = run.cfg.student
    if distill is None and sc.distill.search.enabled:
        distill, chosen = search_distill(run, teacher)
        if chosen is not None:  # trained with the full budget: the search's best model is the student
            model = run.reuse_network(chosen)
            if run.ctx.is_main:
                save_network(model, folder, run.meta(model, "student", experts=sc.experts.as_kwargs(),
                                                     search_candidate=chosen.name))
            return model
    distill = distill or sc.distill
    with timed(run.state.timing, name):
        model = run.network(sc.net, run.num_classes, sc.experts.as_kwargs())
        start_training(run, name, folder)
        model = run.distill_fit(model, sc.train, folder, distill, teacher)
        if run.ctx.is_main:
            save_network(model, folder, run.meta(model, "student", experts=sc.experts.as_kwargs()))
    return model
