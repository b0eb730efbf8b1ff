"""``student.distill.search``: a small grid over the distillation settings, chosen on validation.

Every candidate of the grid (``kd_weight`` x ``temperature`` x ``feat_weight``, in that order; an
empty list keeps the configured value) trains the student from scratch with those settings for
``search.epochs`` epochs (default ``student.train.epochs``) into ``search/c<NN>/``, keeping its best
validation epoch as every stage does, and is scored by the recipe's selection metric on the
**validation** split (mean over the tasks; classification ``acc``, segmentation ``dice``). The test
split is never read. The best mean wins (the first in grid order on a tie).

* ``search.epochs`` equal to ``student.train.epochs`` (or unset): the candidates had the student's
  full budget, so the winning candidate's model *is* the student (``student/`` is a copy of
  ``search/c<NN>/``); nothing is trained again.
* a shorter ``search.epochs``: the student is trained again with the winning settings and the
  full budget.

The ``*_kd`` baselines use the winning settings too. ``search.json`` in the run folder holds the
grid: each candidate's settings, its validation metric per task and mean, and which one was
chosen (:func:`lorkd.report.search.search_table` renders it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ...errors import ConfigError, DataError
from ...fileio import read_json, write_json
from ..core.recipe import DecompositionRecipe
from ..core.runfolder import train_or_reuse
from ..schema import Distill, DistillSearch, Stage

__all__ = ["SEARCH_FILE", "candidate_distill", "search_distill"]

SEARCH_FILE = "search.json"


def candidate_distill(base: Distill, settings: dict[str, Any]) -> Distill:
    """``base`` with a candidate's ``kd_weight``, ``temperature`` and, unless ``None``, ``feat_weight``
    given to every feature term that is on (``feat_weight`` > 0 and each pair with weight > 0)."""
    fw = settings.get("feat_weight")
    return replace(base, kd_weight=float(settings["kd_weight"]), temperature=float(settings["temperature"]),
                   feat_weight=base.feat_weight if fw is None or base.feat_weight == 0 else float(fw),
                   features=[p if fw is None or p.weight == 0 else replace(p, weight=float(fw)) for p in base.features],
                   search=DistillSearch())


def search_distill(run: DecompositionRecipe, teacher: nn.Module) -> tuple[Distill, Path | None]:
    """Run the search (or read its finished ``search.json``) and return the chosen settings, with
    the folder of the chosen candidate's network when it was trained with the full budget
    (then it is the student), else ``None``.

    Raises:
        ConfigError: a candidate has every loss weight at 0.
        DataError: ``search.json`` of this run folder holds another grid.
    """
    if run.state.search_result is not None:
        return run.state.search_result
    sc = run.cfg.student
    search = sc.distill.search
    grid = search.grid(sc.distill)
    epochs = search.epochs or sc.train.epochs
    full = epochs == sc.train.epochs
    path = run.out / SEARCH_FILE
    if path.is_file():
        data = read_json(path)
        if [_settings(c) for c in data.get("candidates", [])] != grid or data.get("epochs") != epochs:
            raise DataError(f"{path}: written by a search over another grid or budget than "
                            f"student.distill.search now; use a new run folder")
    else:
        data = _run_grid(run, teacher, grid, replace(sc.train, epochs=epochs), full)
        if run.ctx.is_main:
            write_json(path, data)
    chosen = next(c for c in data["candidates"] if c["id"] == data["chosen"])
    result = (candidate_distill(sc.distill, chosen), run.out / "search" / chosen["id"] if full else None)
    run.state.search_result = result
    return result


def _settings(candidate: dict[str, Any]) -> dict[str, Any]:
    return {k: candidate[k] for k in ("kd_weight", "temperature", "feat_weight")}


def _run_grid(run: DecompositionRecipe, teacher: nn.Module, grid: list[dict[str, Any]], stage: Stage, full: bool) -> dict[str, Any]:
    sc = run.cfg.student
    key = run.select_metric
    rows = []
    for i, settings in enumerate(grid):
        distill = candidate_distill(sc.distill, settings)
        if distill.ce_weight + distill.kd_weight + distill.feat_weight + sum(p.weight for p in distill.features) <= 0:
            raise ConfigError(f"student.distill.search: candidate {settings} has every loss weight at 0")
        cid = f"c{i:02d}"
        folder = run.out / "search" / cid
        train = lambda: run.distill_fit(run.network(sc.net, run.num_classes, sc.experts.as_kwargs()),  # noqa: E731
                                        stage, folder, distill, teacher)
        meta = lambda m, _: run.meta(m, "student", experts=sc.experts.as_kwargs(),  # noqa: E731
                                     search_candidate={"id": cid, **settings})
        model, _ = train_or_reuse(run, f"search/{cid}", folder, train, meta, timing="search")
        metrics = run.val_metrics(model) if run.ctx.is_main else None  # validation split only
        metrics = run.ctx.broadcast_object(metrics)
        rows.append({"id": cid, **settings, "val": {n: metrics.get(f"{key}_{n}") for n in run.names},
                     "val_mean": metrics[key]})
        del model
    best = max(rows, key=lambda r: -math.inf if r["val_mean"] is None or math.isnan(r["val_mean"]) else r["val_mean"])
    for row in rows:
        row["chosen"] = row is best
    return {"split": "val", "metric": key, "epochs": stage.epochs, "full_budget": full,
            "final": ("the chosen candidate's model is the student (trained with the full budget)" if full else
                      f"the student was trained again with the chosen settings for {sc.train.epochs} epochs"),
            "tasks": list(run.names), "candidates": rows, "chosen": best["id"]}
