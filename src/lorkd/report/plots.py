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
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

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
    "metric_axis_limits",
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


#: Metrics bounded in [0, 1] (their axes end at 1).
UNIT_METRICS = ("acc", "auc", "dice", "f1", "iou", "precision", "recall", "sensitivity", "specificity")


def _is_unit(metric: str) -> bool:
    name = metric.lower()
    return any(name == m or name.startswith(m + "_") for m in UNIT_METRICS)


def metric_axis_limits(metric: str, values: Iterable[float], majority: float | None = None) -> tuple[float, float]:
    """The y range of a figure of ``metric``, chosen so that a tiny gap does not look large.

    * accuracy: from the majority-class rate (the accuracy of a constant prediction; 0 without
      one) to 1;
    * AUC: from 0.5 (chance) to 1;
    * other metrics in [0, 1] (Dice, F1 ...): from 0 to 1;
    * anything else (``hd95``, losses): from 0 to 15% above the largest value.

    The lower end moves down (to a multiple of 0.05) when a value lies below it, so no value is
    ever cut off."""
    vals = [v for v in values if math.isfinite(v)]
    name = metric.lower()
    if _is_unit(metric):
        if name == "acc" or name.startswith("acc_"):
            low = majority if majority is not None and math.isfinite(majority) else 0.0
        elif name == "auc" or name.startswith("auc_"):
            low = 0.5
        else:
            low = 0.0
        if vals and min(vals) < low:
            low = math.floor(min(vals) * 20) / 20
        return max(0.0, low - 0.02 if low > 0 else 0.0), 1.0
    top = max(vals) if vals else 1.0
    return min(0.0, min(vals) if vals else 0.0), (top * 1.15 if top > 0 else 1.0)


def _interval(metrics: Mapping[str, Any], task: str, model: str, metric: str) -> tuple[float, float]:
    iv = (((metrics.get("statistics") or {}).get("intervals") or {}).get(task) or {}).get(model) or {}
    iv = iv.get(metric) or {}
    return to_float(iv.get("low")), to_float(iv.get("high"))


def _majority(metrics: Mapping[str, Any], task: str, split: str) -> float:
    return to_float(((metrics.get("majority") or {}).get(task) or {}).get(split))


def _luminance(colour: str) -> float:
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b


def plot_task_metrics(metrics: Mapping[str, Any], metric: str, path: str | Path, split: str = "tasks") -> Path:
    """Small multiples of ``metric``: one panel per task, one bar per model (named on the x axis),
    the value written inside each bar, 95% bootstrap intervals as error bars when
    ``metrics["statistics"]`` holds them, and the majority-class rate as a dashed line for
    accuracy. Every panel shares the y range of :func:`metric_axis_limits` (accuracy starts at the
    lowest majority rate of the tasks), so bars of different tasks compare by eye.

    Args:
        metrics: a ``metrics.json`` dict.
        metric: the metric key, for example ``"acc"`` or ``"hd95"``.
        path: the PNG to write.
        split: ``"tasks"`` (test split) or ``"val"``.

    A NaN or missing value gets no bar and an ``n/a`` label; an infinite one an ``inf`` label.

    Raises:
        DataError: ``metrics[split]`` is missing, or no task/model holds a finite ``metric``.
    """
    tasks = _tasks(metrics, split)
    task_names = list(tasks)
    models = _models_in(tasks)
    values = np.array([[_value(tasks, t, m, metric) for m in models] for t in task_names], dtype=float)
    if values.size == 0 or not np.isfinite(values).any():
        raise DataError(f"plot_task_metrics: no finite value of metric '{metric}' in metrics['{split}']")
    split_name = metrics.get("split", "test") if split == "tasks" else split
    others = [m for m in models if m not in _COLOURS]
    majorities = {t: _majority(metrics, t, split_name) for t in task_names}
    finite_maj = [v for v in majorities.values() if math.isfinite(v)]
    intervals = {(t, m): _interval(metrics, t, m, metric) if split == "tasks" else (math.nan, math.nan)
                 for t in task_names for m in models}
    lows = [lo for lo, _ in intervals.values()]
    low, high = metric_axis_limits(metric, list(values.ravel()) + lows, min(finite_maj) if finite_maj else None)
    if not _is_unit(metric):
        high = max(high, max((h for _, h in intervals.values() if math.isfinite(h)), default=high) * 1.05)
    n_t, n_m = len(task_names), len(models)
    ncols = min(3, n_t)
    nrows = math.ceil(n_t / ncols)
    fig = Figure(figsize=(max(3.2, 0.55 * n_m + 1.0) * ncols, 3.6 * nrows), layout="constrained")
    x = np.arange(n_m)
    colours = [model_colour(m, others) for m in models]
    ax = None
    for i, task in enumerate(task_names):
        ax = fig.add_subplot(nrows, ncols, i + 1, sharey=ax)
        col = values[i]
        ax.bar(x, np.where(np.isfinite(col), col - low, 0.0), 0.75, bottom=low, color=colours,
               edgecolor="white", linewidth=0.5)
        for j, v in enumerate(col):
            lo, hi = intervals[(task, models[j])]
            if math.isfinite(v) and math.isfinite(lo) and math.isfinite(hi):
                ax.errorbar([j], [v], yerr=[[max(v - lo, 0.0)], [max(hi - v, 0.0)]], color="black", capsize=3, lw=1)
            text = _fmt_bar(v) if not math.isnan(v) else "n/a"
            inside = math.isfinite(v) and (v - low) > 0.25 * (high - low)
            # in the middle of the bar: clear of the error bar above and the majority line below
            y = (low + v) / 2 if inside else low + 0.02 * (high - low)
            ax.text(j, y, text, rotation=90, ha="center", va="center" if inside else "bottom", fontsize=7.5,
                    color="white" if inside and _luminance(colours[j]) < 0.6 else "black")
        maj = majorities[task]
        if metric.lower() == "acc" and math.isfinite(maj):
            ax.axhline(maj, color="black", ls="--", lw=1, label="majority class")
        ax.set_xticks(x)
        ax.set_xticklabels(models, rotation=45, ha="right", fontsize=8)
        ax.set_title(task, fontsize=10)
        ax.set_ylim(low, high)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if i % ncols == 0:
            direction = "higher is better" if higher_is_better(metric) else "lower is better"
            ax.set_ylabel(f"{metric} ({direction})")
    notes = []
    if any(math.isfinite(lo) for lo, _ in intervals.values()):
        notes.append("error bars: 95% bootstrap interval")
    if metric.lower() == "acc" and finite_maj:
        notes.append("dashed: majority-class rate; axis starts at the lowest one")
    fig.suptitle(f"{metric} per task ({split_name})" + (f"\n{'; '.join(notes)}" if notes else ""), fontsize=10)
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


def _distinct(series: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``series`` without a curve that repeats an earlier one (``ce`` when it is the whole ``loss``;
    the one task's ``val/acc_<task>`` of a single-task model)."""
    out: dict[str, np.ndarray] = {}
    for k, s in series.items():
        if not any(s.shape == o.shape and np.allclose(s, o, rtol=0, atol=1e-6, equal_nan=True) for o in out.values()):
            out[k] = s
    return out


def _legend_outside(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_training_curves(histories: Mapping[str, list[Mapping[str, Any]]], path: str | Path) -> Path:
    """One row per stage, two panels: the training loss and its parts (``loss``, ``ce``, ``kd``,
    ``feat`` ...; per-task losses ``loss/<task>`` are left out) on the left, the validation
    metrics (``val/*``, ``*acc*``, ``*dice*`` ...) on the right; each panel's legend sits outside it,
    to its right.

    The x axis counts completed epochs: a record's ``epoch`` is the 0-based index the trainer
    writes, drawn as ``epoch + 1``, with whole-number ticks only. Without an ``epoch`` on every
    record the x axis is the record number.

    Args:
        histories: ``{STAGE: [record, ...]}``, each record one line of ``history.jsonl``. Keys vary;
            every numeric key except bookkeeping (``epoch``, ``step``, ``lr``, ``seconds`` ...)
            is drawn.
        path: the PNG to write.

    Raises:
        DataError: no stage holds a numeric value to draw.
    """
    stages = [(name, _history_series(list(recs or []))) for name, recs in histories.items()]
    stages = [(name, s) for name, s in stages if s[2]]
    if not stages:
        raise DataError("plot_training_curves: no history holds a numeric value to plot "
                        f"(stages: {sorted(histories) or 'none'})")
    fig = Figure(figsize=(12.0, 2.9 * len(stages)), layout="constrained")
    for i, (name, (x, xlabel, series)) in enumerate(stages):
        if xlabel == "epoch":
            x, xlabel = x + 1, "epochs completed"
        losses = _distinct({k: s for k, s in series.items() if not _is_metric_key(k) and "/" not in k})
        mets = _distinct({k: s for k, s in series.items() if _is_metric_key(k)})
        for col, (group, ylabel) in enumerate(((losses, "training loss"), (mets, "validation metric"))):
            ax = fig.add_subplot(len(stages), 2, 2 * i + col + 1)
            for j, (k, s) in enumerate(group.items()):
                per_task = "_" in k.split("/")[-1] and col == 1
                ax.plot(x, s, marker="." if len(x) < 30 else None, label=k, color=_CURVE_COLOURS[j % len(_CURVE_COLOURS)],
                        lw=2.0 if k in ("loss", "val/acc", "val/dice", "val_acc") else 1.0, ls="--" if per_task else "-")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if len(x):
                ax.set_xlim(float(np.nanmin(x)) - 0.3, float(np.nanmax(x)) + 0.3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{name}: {'loss' if col == 0 else 'validation'}", fontsize=10)
            ax.grid(alpha=0.3)
            if not group:
                ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)
            _legend_outside(ax)
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


def _fmt_params(x: float, _pos: Any = None) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "*", "p")


def plot_size_vs_metric(metrics: Mapping[str, Any], metric: str, path: str | Path) -> Path:
    """Scatter of parameter count (log x) against the mean of ``metric`` over tasks: one point
    per model that has a parameter count (``metrics["params"][MODEL]``: the teacher, the expert,
    the student and every baseline), each with its own colour and marker, named with its value in
    a legend outside the axes (models of equal size would hide each other's labels). The y range
    is :func:`metric_axis_limits` (accuracy from the mean majority-class rate over tasks).

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
    fig = Figure(figsize=(7.6, 4.4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for i, (model, p, mean, k, n) in enumerate(points):
        label = (model if k == n else f"{model} ({k}/{n} tasks)") + f": {mean:.3f}, {p / 1e6:.2f}M"
        ax.scatter([p], [mean], s=70 if model != "expert" else 110, color=model_colour(model, others),
                   marker=_MARKERS[i % len(_MARKERS)], edgecolor="black", linewidth=0.6, zorder=3, label=label)
    maj = [_majority(metrics, t, metrics.get("split", "test")) for t in _tasks(metrics)]
    maj = [v for v in maj if math.isfinite(v)]
    low, high = metric_axis_limits(metric, [pt[2] for pt in points], float(np.mean(maj)) if maj else None)
    if metric.lower() == "acc" and maj:
        ax.axhline(float(np.mean(maj)), color="black", ls="--", lw=1, label=f"majority class (mean): {np.mean(maj):.3f}")
    ax.set_ylim(low, high)
    ax.set_xscale("log")
    xs = [pt[1] for pt in points]
    ax.set_xlim(min(xs) / 2.0, max(xs) * 2.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_fmt_params))
    ax.xaxis.set_minor_formatter(NullFormatter())
    direction = "higher is better" if higher_is_better(metric) else "lower is better"
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(f"mean {metric} over tasks ({direction})")
    ax.set_title(f"model size vs {metric} ({metrics.get('split', 'test')} split)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    _legend_outside(ax)
    return _save(fig, path)
