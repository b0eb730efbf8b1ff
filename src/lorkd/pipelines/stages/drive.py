"""Running a decomposition recipe's stages in order, with the run folder's checks first and
``metrics.json`` last."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...config import load_yaml, to_dict, write_config
from ...errors import DataError
from ...factories import trusted_code
from ...fileio import read_json, write_json
from ..core.netio import has_network
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import preflight, startup_summary
from ..core.runtime import timed
from .baselines import stage_baselines
from .evaluate import stage_evaluate
from .export import stage_export
from .routed import load_router, stage_export_routed
from .student import check_feature_layers, stage_student
from .teacher import stage_teacher

log = logging.getLogger("lorkd")


def drive(run: DecompositionRecipe, stages: tuple[str, ...] | None = None, reuse: bool = False) -> dict[str, Any] | None:
    """Run ``stages`` (default: all of the recipe's) in order on ``run``; earlier stages' outputs are
    reused when present.

    First :func:`~lorkd.pipelines.core.runfolder.preflight` (fingerprints of the stages to reuse,
    networks to train, before anything is written; ``reuse`` accepts differing fingerprints).
    Writes ``config.yaml`` (unless a stage was accepted with ``reuse`` although its config
    differs: config.yaml then keeps describing the models in the folder) and ``metrics.json``
    (with ``timing_s``, ``config`` and ``stages``) last. Factories outside the known namespaces
    are accepted only with ``cfg.trust_code``. Returns the metrics when ``evaluate`` ran (on
    rank 0), else ``None``.
    """
    with trusted_code(run.cfg.trust_code):
        return _drive(run, stages or run.stages, reuse)


def _drive(run: DecompositionRecipe, stages: tuple[str, ...], reuse: bool) -> dict[str, Any] | None:
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
        router = load_router(run) if run.cfg.student.router is not None else None
        if "export" in stages or "evaluate" in stages:
            with timed(run.state.timing, "export"):
                stage_export(run, student)
                if router is not None:
                    stage_export_routed(run, student, router)
        if not evaluating:
            if baselines:
                log.info("baselines in %s; `lorkd evaluate` adds them to metrics.json and report.md", out / "baselines")
            return None
        with timed(run.state.timing, "evaluate"):
            metrics = stage_evaluate(run, teacher, student, baselines, router)
        return _finish(run, metrics, mismatch)
    finally:
        if ctx.is_main:
            _record_timing(out, run.state.timing)


def _finish(run: DecompositionRecipe, metrics: dict[str, Any], mismatch: dict[str, list[str]]) -> dict[str, Any]:
    """Add the teacher, timing, config and stage log to ``metrics`` and write ``metrics.json``."""
    out, info = run.out, run.state.teacher_info
    metrics["teacher"] = info
    # the first clause (where it came from); the report's "Teacher" line gives all of it
    metrics["models"] = {**metrics.get("models", {}), "teacher": info["description"].split(";")[0]}
    metrics["timing_s"] = _record_timing(out, run.state.timing)
    if mismatch and (out / "config.yaml").is_file():  # --reuse: the config of the models in the folder
        metrics["config"] = {k: v for k, v in load_yaml(out / "config.yaml").items() if k != "recipe"}
    else:
        metrics["config"] = to_dict(run.cfg)
    metrics["stages"] = run.state.stage_log
    if mismatch:
        metrics.setdefault("notes", []).append(
            "--reuse: stages were reused although their config differs from this command's; config.yaml and "
            "the Config section describe the models in the folder; see Stages for the differing keys.")
    write_json(out / "metrics.json", metrics)
    return metrics


def _record_timing(out: Path, timing: dict[str, float]) -> dict[str, float]:
    """Merge this command's stage times into ``out/timing.json`` (stages run by separate
    commands add up there) and return the merged times."""
    path = out / "timing.json"
    merged = {**(read_json(path) if path.is_file() else {}), **timing}
    write_json(path, merged)
    return merged
