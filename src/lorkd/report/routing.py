"""The report's routing section (a run with ``student.router``): reads ``metrics.json`` ``routing``
(written by :func:`lorkd.pipelines.recipes.routing_scores.routing_summary` through
:func:`lorkd.pipelines.core.scoring.summarize`).

It shows the task-routing accuracy, the task confusion matrix, and per task the task-agnostic
accuracy (route, then classify; a wrong route is a wrong answer; segmentation: the Dice of each
case routed once) beside the score with the true task id (and of ``mola_grad`` when it ran), with 95% bootstrap intervals and the paired
differences with their verdicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .stats import verdict
from .tables import fmt_interval
from .tables import fmt_value, markdown_table


def routing_section(metrics: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the routing section, or ``[]`` when ``metrics`` has no ``routing``. The
    score is ``routing["metric"]`` (``acc``; ``dice`` for segmentation, per case), items are
    ``routing["unit"]`` (images; cases)."""
    routing = metrics.get("routing")
    if not isinstance(routing, Mapping) or not routing.get("per_task"):
        return []
    tasks, per_task = list(routing.get("tasks") or routing["per_task"]), routing["per_task"]
    m, unit = routing.get("metric", "acc"), routing.get("unit", "images")
    mola = all(f"mola_grad_{m}" in per_task[t] for t in tasks)
    out = ["## Routing without a task id (MoLA-Router)", "",
           f"Inference: {routing.get('inference', 'top-1 routing')}. Test split; cells are value [95% bootstrap "
           f"interval]; *difference* is the paired bootstrap of task-agnostic minus the other, with its verdict.", "",
           f"**Task-routing accuracy: {fmt_interval(routing.get('route_acc'))}** over all test {unit}"
           + (f"; router parameters: {routing['router_parameters']:,}" if routing.get("router_parameters") else "")
           + ".", ""]
    header = ["task", "n", "routing acc", f"task-agnostic {m}", f"{m} with true task id", "difference"]
    header += [f"mola_grad {m}", "difference vs mola_grad"] if mola else []
    rows = []
    for t in tasks:
        row = per_task[t]
        diff = row.get("task_agnostic_minus_true_id")
        cells = [t, row.get("n", "n/a"), fmt_interval(row.get("route_acc")), fmt_interval(row.get(f"task_agnostic_{m}")),
                 fmt_interval(row.get(f"true_id_{m}")), f"{fmt_interval(diff, signed=True)} {verdict(diff)}"]
        if mola:
            diff = row.get("task_agnostic_minus_mola_grad")
            cells += [fmt_interval(row.get(f"mola_grad_{m}")), f"{fmt_interval(diff, signed=True)} {verdict(diff)}"]
        rows.append(cells)
    mean = routing.get("mean") or {}
    keys = ["route_acc", f"task_agnostic_{m}", f"true_id_{m}"] + ([f"mola_grad_{m}"] if mola else [])
    rows.append(["mean", "", *(fmt_value(mean.get(k)) for k in keys[:3]), ""]
                + ([fmt_value(mean.get(keys[3])), ""] if mola else []))
    out += [markdown_table(header, rows, align="lr" + "r" * (len(header) - 2)), ""]
    confusion = routing.get("confusion") or []
    if confusion:
        out += [f"### Task confusion matrix (rows: true task, columns: routed task; test {unit})", "",
                markdown_table(["true \\ routed", *tasks], [[t, *row] for t, row in zip(tasks, confusion)],
                               align="l" + "r" * len(tasks)), ""]
    return out
