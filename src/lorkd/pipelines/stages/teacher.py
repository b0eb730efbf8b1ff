"""The teacher stage: train the foundation model on all tasks, reuse it, or load ``teacher.source``
and adapt it (:mod:`.adapt`)."""

from __future__ import annotations

from torch import nn

from ...fileio import read_json
from ..core.netio import META
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import train_or_reuse
from ..schema import Distill
from .adapt import build_from_meta, load_source_teacher, teacher_description
from .ensemble import load_ensemble_teacher


def stage_teacher(run: DecompositionRecipe) -> nn.Module:
    """Train the foundation model on all tasks, or load ``teacher.source`` (and adapt it, see
    :mod:`lorkd.pipelines.stages.adapt`); writes ``teacher/`` and sets ``run.state.teacher_info``
    (where the teacher came from, what was adapted and how long: recorded in ``teacher/model.json``)."""
    folder = run.out / "teacher"
    tcfg = run.cfg.teacher
    state = run.state
    if isinstance(tcfg.source, list):  # an ensemble of teachers (stages/ensemble.py)
        model = load_ensemble_teacher(run, folder)
    elif tcfg.source is not None:
        model = load_source_teacher(run, folder)
    else:
        def train() -> nn.Module:
            model = run.network(tcfg.net, run.num_classes)
            objective = run.objective(Distill(kd_weight=0.0), stage=tcfg.train)
            # a run may give its teacher more training data than its students (data.student_n_train)
            return run.fit(model, tcfg.train, folder, objective, train_set=run.teacher_train_data())

        def meta(model: nn.Module, seconds: float) -> dict:
            info = {"source": {"kind": "trained", "net": tcfg.net.arch},
                    "adapt": {"mode": "trained on all tasks", "epochs": tcfg.train.epochs, "seconds": seconds}}
            return run.meta(model, "teacher", teacher_info={**info, "description": teacher_description(info)})

        model, saved = train_or_reuse(run, "teacher", folder, train, meta,
                                      reuse=lambda: run.reuse_network(folder, build=lambda m: build_from_meta(run, m)))
        state.teacher_info = (saved or read_json(folder / META)).get("teacher_info") or {
            "source": {"kind": "trained", "net": tcfg.net.arch}, "adapt": {"epochs": tcfg.train.epochs}}
    state.teacher_info.setdefault("description", teacher_description(state.teacher_info))
    return model
