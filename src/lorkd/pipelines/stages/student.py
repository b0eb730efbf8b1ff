"""The student stage: decompose the teacher into a LoRKD student (one low-rank expert per task)."""

from __future__ import annotations

from torch import nn

from ..core.features import check_layer_names
from ..core.fingerprint import write_fingerprint
from ..core.netio import has_network, save_network
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import record_stage, reuse_stage, train_stage
from ..schema import Distill
from .routed import ROUTER, train_routed
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
                  distill: Distill | None = None, routed: bool | None = None) -> nn.Module:
    """Decompose: train the student with experts, distilling from ``teacher``; writes ``<name>/``.

    Without ``distill``: ``student.distill``, or with ``student.distill.search`` the settings the
    search chose on validation (:mod:`lorkd.pipelines.stages.search`). ``routed`` (default: with
    ``student.router``, for ``name == "student"`` only): train it with a router
    (:mod:`lorkd.pipelines.stages.routed`; the search's candidates are not routed, so its
    settings are used to train the routed student again)."""
    folder = run.out / name
    sc = run.cfg.student
    routed = sc.router is not None and name == "student" if routed is None else routed
    if has_network(folder) and (not routed or has_network(folder / ROUTER)):
        return reuse_stage(run, name, folder)
    if distill is None and sc.distill.search.enabled:
        distill, chosen = search_distill(run, teacher)
        if chosen is not None and not routed:  # trained with the full budget: the search's best model is the student
            model = run.reuse_network(chosen)
            if run.ctx.is_main:
                write_fingerprint(folder, name, run.cfg, run.state.fingerprint_extra)
                save_network(model, folder, run.meta(model, "student", experts=sc.experts.as_kwargs(),
                                                     search_candidate=chosen.name))
            record_stage(run, name, "loaded", chosen)
            return model
    distill = distill or sc.distill

    def train() -> nn.Module:
        model = run.network(sc.net, run.num_classes, sc.experts.as_kwargs())
        if routed:
            return train_routed(run, model, folder, distill, teacher)
        return run.distill_fit(model, sc.train, folder, distill, teacher)

    return train_stage(run, name, folder, train, lambda m, _: run.meta(m, "student", experts=sc.experts.as_kwargs()))[0]
