"""Figures for a run report: per-task metric bars, training curves, size versus quality.

Everything here uses matplotlib's object-oriented API (``matplotlib.figure.Figure`` rendered by
the Agg canvas), never ``pyplot``: no global backend is switched, no GUI is needed, and no figure
stays registered in pyplot's figure manager, so nothing leaks between calls.

Every ``plot_*`` function creates the parent folders of ``path``, writes one PNG, drops the
figure and returns ``path`` as a :class:`~pathlib.Path`. When there is nothing to draw (no task
holds the metric, no model has a parameter count, no history holds a number) it raises
:class:`lorkd.errors.DataError` naming the metric or the missing data rather than writing an empty
picture.

The metrics dict is the one written by the pipelines to ``metrics.json``
(``{"tasks": {TASK: {MODEL: {METRIC: float}}}, "params": {MODEL: int}, ...}``); any subset of
models may be present, and a value may be NaN or missing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorkd.errors import DataError

__all__ = [
    "MODEL_ORDER",
    "LOWER_IS_BETTER",
    "higher_is_better",
    "model_order",
    "model_colour",
    "to_float",
    "plot_task_metrics",
    "plot_training_curves",
    "plot_size_vs_metric",
    "size_points",
]

#: Display order of the models lorkd knows; any other model follows in order of appearance.
MODEL_ORDER = ("teacher", "expert", "student", "student_nokd", "stl", "stl_kd", "mtl", "mtl_kd")

#: Metrics for which a smaller value is better (distances, errors, losses).
LOWER_IS_BETTER = frozenset({"hd95", "hd", "asd", "assd", "msd", "loss", "nll", "ece", "brier", "error", "mae", "mse"})

# Fixed colours, so that a model looks the same in every figure of every report.
_COLOURS = {
    "teacher": "#4d4d4d",       # dark grey: the reference
    "expert": "#d62728",        # red: the product
    "student": "#ff7f0e",       # orange: the multi-task student the experts come from
    "student_nokd": "#ffbb78",  # light orange: the same without distillation
    "stl": "#1f77b4",           # blue: single-task baseline
    "stl_kd": "#aec7e8",        # light blue: single-task with distillation
    "mtl": "#2ca02c",           # green: plain multi-task baseline
    "mtl_kd": "#98df8a",        # light green: multi-task with distillation
}
_SPARE_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
                  "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79")

# History keys that are bookkeeping rather than curves worth drawing.
# Line colours of training curves, shared by both axes so that no two curves look alike.
_CURVE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"]
_HISTORY_SKIP = frozenset({"epoch", "step", "iteration", "lr", "seconds", "time", "wall", "samples"})
_METRIC_HINTS = ("acc", "auc", "dice", "hd95", "f1", "iou", "precision", "recall")


def higher_is_better(metric: str) -> bool:
    """False for distance / error / loss metrics (``hd95``, ``loss`` ...), True otherwise."""
    name = metric.lower()
    return not (name in LOWER_IS_BETTER or name.endswith("_loss") or name.startswith("loss"))


def model_order(models: Iterable[str]) -> list[str]:
    """The unique names of ``models`` in display order: :data:`MODEL_ORDER` first, then the rest
    in order of first appearance."""
    seen: list[str] = []
    for m in models:
        if m not in seen:
            seen.append(m)
    known = [m for m in MODEL_ORDER if m in seen]
    return known + [m for m in seen if m not in MODEL_ORDER]


def model_colour(model: str, others: list[str] | None = None) -> str:
    """The fixed colour of a known model; an unknown one takes a spare colour by its index in
    ``others`` (the list of unknown models of the figure), or by a stable hash of its name."""
    if model in _COLOURS:
        return _COLOURS[model]
    if others is not None and model in others:
        idx = others.index(model)
    else:
        idx = sum(ord(c) for c in model)
    return _SPARE_COLOURS[idx % len(_SPARE_COLOURS)]


def to_float(value: Any) -> float:
    """``value`` as a float; ``None``, booleans, strings and anything not numeric give NaN."""
    if value is None or isinstance(value, (bool, str)):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _tasks(metrics: Mapping[str, Any], key: str = "tasks") -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get(key), Mapping):
        raise DataError(f"metrics: missing key '{key}' (expected {{TASK: {{MODEL: {{METRIC: float}}}}}})")
    return metrics[key]


def _models_in(tasks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return model_order(m for per_model in tasks.values() if isinstance(per_model, Mapping) for m in per_model)


def _value(tasks: Mapping[str, Any], task: str, model: str, metric: str) -> float:
    per_model = tasks.get(task)
    if not isinstance(per_model, Mapping) or not isinstance(per_model.get(model), Mapping):
        return math.nan
    return to_float(per_model[model].get(metric))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clear()
    return path


def _fmt_bar(v: float) -> str:
    if not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"


# --------------------------------------------------------------------------------------------


def plot_task_metrics(metrics: Mapping[str, Any], metric: str, path: str | Path, split: str = "tasks") -> Path:
    """Grouped bar chart of ``metric``: one group per task, one bar per model, values on bars.

    Args:
        metrics: a ``metrics.json`` dict.
        metric: the metric key, for example ``"acc"`` or ``"hd95"``.
        path: the PNG to write.
        split: ``"tasks"`` (test split) or ``"val"``.

    A NaN or missing value gets no bar and an ``n/a`` label at the baseline; an infinite value
    gets no bar and an ``inf`` label.

    Raises:
        DataError: ``metrics[split]`` is missing, or no task/model holds a finite ``metric``.
    """
    tasks = _tasks(metrics, split)
    task_names = list(tasks)
    models = _models_in(tasks)
    values = np.array([[_value(tasks, t, m, metric) for m in models] for t in task_names], dtype=float)
    if values.size == 0 or not np.isfinite(values).any():
        raise DataError(f"plot_task_metrics: no finite value of metric '{metric}' in metrics['{split}']")

    others = [m for m in models if m not in _COLOURS]
    n_t, n_m = len(task_names), len(models)
    width = 0.8 / n_m
    fig = Figure(figsize=(max(6.0, 1.0 + n_t * (0.45 * n_m + 0.4)), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    finite = values[np.isfinite(values)]
    top, bottom = max(float(finite.max()), 0.0), min(float(finite.min()), 0.0)
    span = (top - bottom) or 1.0
    label_size = 8 if n_m <= 5 else 6.5
    x = np.arange(n_t)
    for j, model in enumerate(models):
        xs = x - 0.4 + width * (j + 0.5)
        col = values[:, j]
        heights = np.where(np.isfinite(col), col, 0.0)
        bars = ax.bar(xs, heights, width * 0.92, label=model, color=model_colour(model, others),
                      edgecolor="white", linewidth=0.5)
        for bar, v, xpos in zip(bars, col, xs):
            if math.isfinite(v):
                y, text = v, _fmt_bar(v)
            else:
                bar.set_visible(False)
                y, text = 0.0, ("n/a" if math.isnan(v) else _fmt_bar(v))
            ax.text(xpos, y + (0.01 * span if y >= 0 else -0.01 * span), text, rotation=90, fontsize=label_size,
                    ha="center", va="bottom" if y >= 0 else "top")
    ax.set_xticks(x)
    ax.set_xticklabels(task_names, rotation=20 if n_t > 4 else 0, ha="right" if n_t > 4 else "center")
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_ylabel(f"{metric} ({direction})")
    split_name = metrics.get("split", "test") if split == "tasks" else split
    ax.set_title(f"{metric} per task ({split_name})")
    ax.set_ylim(bottom - (0.05 * span if bottom < 0 else 0.0), top + 0.22 * span)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def _history_series(records: list[Mapping[str, Any]]) -> tuple[np.ndarray, str, dict[str, np.ndarray]]:
    """x values, x label and one float array per numeric key (NaN where a record lacks it)."""
    keys: list[str] = []
    for rec in records:
        for k, v in rec.items():
            if k not in keys and k not in _HISTORY_SKIP and isinstance(v, numbers.Real) and not isinstance(v, bool):
                keys.append(k)
    epochs = np.array([to_float(r.get("epoch")) for r in records], dtype=float)
    if len(records) and np.isfinite(epochs).all():
        x, xlabel = epochs, "epoch"
    else:
        x, xlabel = np.arange(1, len(records) + 1, dtype=float), "record"
    series = {k: np.array([to_float(r.get(k)) for r in records], dtype=float) for k in keys}
    return x, xlabel, {k: s for k, s in series.items() if np.isfinite(s).any()}


def _is_metric_key(key: str) -> bool:
    name = key.lower()
    if "loss" in name:
        return False
    return name.startswith("val") or any(h in name for h in _METRIC_HINTS)


def plot_training_curves(histories: Mapping[str, list[Mapping[str, Any]]], path: str | Path) -> Path:
    """One subplot per stage: losses (``loss`` and its parts: ``ce``, ``kd``, ``feat`` ...) against
    epoch on the left axis, validation metrics (``val_*``, ``*acc*``, ``*dice*`` ...) on a twin
    right axis.

    Args:
        histories: ``{STAGE: [record, ...]}``, each record one line of ``history.jsonl``. Keys vary;
            every numeric key except bookkeeping (``epoch``, ``step``, ``lr``, ``seconds`` ...)
            is drawn. Without an ``epoch`` on every record the x axis is the record number.
        path: the PNG to write.

    Raises:
        DataError: no stage holds a numeric value to draw.
    """
    stages = [(name, _history_series(list(recs or []))) for name, recs in histories.items()]
    stages = [(name, s) for name, s in stages if s[2]]
    if not stages:
        raise DataError("plot_training_curves: no history holds a numeric value to plot "
                        f"(stages: {sorted(histories) or 'none'})")
    n = len(stages)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows))
    for i, (name, (x, xlabel, series)) in enumerate(stages):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        losses = {k: s for k, s in series.items() if not _is_metric_key(k)}
        mets = {k: s for k, s in series.items() if _is_metric_key(k)}
        handles = []
        colours = iter(_CURVE_COLOURS * (1 + len(series) // len(_CURVE_COLOURS)))
        for k, s in losses.items():
            handles += ax.plot(x, s, marker="." if len(x) < 30 else None, lw=2.0 if k == "loss" else 1.2,
                               label=k, color=next(colours))
        if xlabel in ("epoch", "record"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss" if losses else "")
        ax.grid(alpha=0.3)
        if mets:
            ax2 = ax.twinx()
            for k, s in mets.items():
                handles += ax2.plot(x, s, ls="--", marker="o" if len(x) < 30 else None, ms=3, label=k,
                                    color=next(colours))
            ax2.set_ylabel("validation metric")
        ax.set_title(str(name))
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, frameon=False, loc="upper center",
                  bbox_to_anchor=(0.5, -0.16), ncol=min(4, len(handles)))
    fig.tight_layout()
    return _save(fig, path)


def size_points(metrics: Mapping[str, Any], metric: str) -> list[tuple[str, int, float, int, int]]:
    """``(model, params, mean metric over tasks, tasks with a finite value, tasks)`` for every
    model that has both a parameter count in ``metrics["params"]`` and at least one finite value
    of ``metric`` on the test split. The mean is NaN-aware (over the tasks that have a value)."""
    tasks = _tasks(metrics)
    params = metrics.get("params") or {}
    out = []
    for model in _models_in(tasks):
        p = to_float(params.get(model))
        if not (math.isfinite(p) and p > 0):
            continue
        vals = np.array([_value(tasks, t, model, metric) for t in tasks], dtype=float)
        ok = np.isfinite(vals)
        if ok.any():
            out.append((model, int(p), float(vals[ok].mean()), int(ok.sum()), len(vals)))
    return out


def plot_size_vs_metric(metrics: Mapping[str, Any], metric: str, path: str | Path) -> Path:
    """Scatter of parameter count (log x) against the mean of ``metric`` over tasks, one
    annotated point per model that has a parameter count (``metrics["params"][MODEL]``).

    A model that lacks a finite value on some tasks is labelled ``model (k/n tasks)``: its mean
    covers fewer tasks and is not directly comparable.

    Raises:
        DataError: ``metrics["tasks"]`` is missing, or no model has both a parameter count and
            a finite ``metric``.
    """
    points = size_points(metrics, metric)
    if not points:
        raise DataError(f"plot_size_vs_metric: no model has both metrics['params'][MODEL] and a finite '{metric}'")
    others = [p[0] for p in points if p[0] not in _COLOURS]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    for model, p, mean, k, n in points:
        ax.scatter([p], [mean], s=70, color=model_colour(model, others), edgecolor="black", linewidth=0.5, zorder=3)
        label = model if k == n else f"{model} ({k}/{n} tasks)"
        ax.annotate(f"{label}\n{mean:.3f}", (p, mean), textcoords="offset points", xytext=(7, 5), fontsize=8)
    ax.set_xscale("log")
    xs = [p[1] for p in points]
    ax.set_xlim(min(xs) / 2.0, max(xs) * 4.0)
    ys = [p[2] for p in points]
    pad = (max(ys) - min(ys)) * 0.25 or 0.05 * (abs(max(ys)) or 1.0)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"mean {metric} over tasks ({direction})")
    ax.set_title(f"model size vs {metric}")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
