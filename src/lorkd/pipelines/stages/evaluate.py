"""The evaluate stage: every model of the run scored on validation and test by the recipe, one path
for every recipe; the recipe adds sizes, FLOPs, latency and notes (:meth:`~DecompositionRecipe.summary`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ...experts import load_expert
from ...report.stats import run_statistics, save_predictions
from ..core.recipe import DecompositionRecipe
from .baselines import baseline_parameters

Table = dict[str, dict[str, dict[str, float]]]  # {task: {model: {metric: value}}}


def score_models(run: DecompositionRecipe, teacher: nn.Module, student: nn.Module, baselines: dict[str, Any]
                 ) -> tuple[dict[str, Table], dict[str, dict[str, dict[str, np.ndarray]]]]:
    """``({"val"|"test": table}, outputs)``: the teacher, the student, each exported expert and each
    baseline scored on both splits; ``outputs[task][model]``: the per-item test outputs (bootstrap)."""
    dev = run.ctx.device
    results: dict[str, Table] = {}
    outputs: dict[str, dict[str, dict[str, np.ndarray]]] = {name: {} for name in run.names}
    for split, dataset in (("val", run.val_set), ("test", run.test_set)):
        table: Table = {name: {} for name in run.names}

        def score(label: str, model: nn.Module, data: Any, tasks: list[int] | None = None,
                  names: list[str] = run.names) -> None:
            kept: dict[int, dict[str, np.ndarray]] = {}
            for t, m in run.score(model, data, tasks, keep=kept, final=split == "test").items():
                table[names[t]][label] = m
                if split == "test":
                    outputs[names[t]][label] = kept[t]

        for label, model in (("teacher", teacher), ("student", student)):
            score(label, model, dataset)
        for t, name in enumerate(run.names):
            score("expert", load_expert(run.out / "experts" / name).to(dev), dataset, [t])
        for bname, models in baselines.items():
            if isinstance(models, nn.Module):  # student_nokd: a full student
                score(bname, models, dataset)
                continue
            for tasks, model in models.items():
                score(bname, model, run.dataset(split, list(tasks)), names=[run.names[t] for t in tasks])
        results[split] = table
    return results, outputs


def stage_evaluate(run: DecompositionRecipe, teacher: nn.Module, student: nn.Module,
                   baselines: dict[str, Any], router: nn.Module | None = None) -> dict[str, Any]:
    """The metrics of every model on val and test (``predictions.npz`` per test item), sizes,
    FLOPs, latency and the paired statistics; what ``metrics.json`` holds before the driver's keys.
    With ``router`` (a routed student), also ``routing``: the student routed by it on test, beside
    the student with the task id (:meth:`~DecompositionRecipe.routing_summary`)."""
    results, outputs = score_models(run, teacher, student, baselines)
    save_predictions(run.out, outputs)
    metrics = run.summary(teacher, student, results)
    metrics["params"].update(baseline_parameters(baselines))
    metrics["statistics"] = run_statistics(outputs, metrics["metric_keys"], run.select_metric, results["val"],
                                           list(baselines))
    if router is not None:
        metrics["routing"] = run.routing_summary(student, router.to(run.ctx.device), outputs)
        metrics["routing"]["router_parameters"] = sum(p.numel() for p in router.plain()[0].parameters())
    return metrics
