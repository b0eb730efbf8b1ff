"""The markdown report of one run: ``run_dir/report.md`` plus its figures in ``run_dir/plots/``.

>>> from lorkd.report import write_report, load_histories
>>> write_report("runs/demo", read_json("runs/demo/metrics.json"), config)   # -> runs/demo/report.md

The report holds, in order: a summary (what was compared, on what data; a warning when the teacher
is worse than the student trained without distillation on validation; per task the expert against
the teacher and against the best baseline chosen on validation, with 95% paired bootstrap intervals
of the difference and a verdict beats / ties / is below, see :mod:`lorkd.report.stats`), the data
table, one results table per metric (rows tasks, columns models, best value in bold, a mean row;
the accuracy table adds the majority-class rate), the 95% bootstrap intervals per model, the same
tables on the validation split, model sizes / FLOPs / latency with ratios to the teacher, time per
stage, the figures (relative links), the notes, the machine, and the exact config in a ```yaml
block.

Conventions: a missing, ``None`` or NaN value prints ``n/a``; an infinite one ``inf``. "Best" is
the largest value, except for metrics where lower is better (``hd95``, losses:
:func:`lorkd.report.plots.higher_is_better`). *Baselines* are every model other than
``teacher``, ``expert`` and ``student`` (the multi-task student the experts are cut from).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lorkd.errors import DataError
from lorkd.fileio import read_jsonl, write_atomic

from .plots import (
    higher_is_better,
    model_order,
    plot_size_vs_metric,
    plot_task_metrics,
    plot_training_curves,
    size_points,
    to_float,
)
from .routing import routing_section
from .search import search_section
from .stats import verdict
from .tables import fmt_count, fmt_interval, fmt_value, markdown_table

__all__ = [
    "NON_BASELINES",
    "fmt_value",
    "fmt_count",
    "fmt_interval",
    "interval_table",
    "teacher_guard",
    "markdown_table",
    "metric_table",
    "load_histories",
    "write_report",
]

#: Models that are not baselines: the reference and the method's own models.
NON_BASELINES = frozenset({"teacher", "expert", "student"})

_DATA_COLUMNS = ("name", "source", "num_classes", "channels", "n_train", "n_val", "n_test")


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _fmt_ratio(value: Any, ref: Any) -> str:
    v, r = to_float(value), to_float(ref)
    if not (math.isfinite(v) and math.isfinite(r)) or r == 0:
        return "n/a"
    return f"{v / r:.3g}×"


def best_mask(values: Sequence[float], metric: str, digits: int = 3) -> list[bool]:
    """Which of ``values`` are the best finite one for ``metric`` after rounding to ``digits``
    (ties are all best). NaN and inf are never best."""
    rounded = [round(v, digits) if math.isfinite(v) else math.nan for v in values]
    finite = [v for v in rounded if math.isfinite(v)]
    if not finite:
        return [False] * len(values)
    best = max(finite) if higher_is_better(metric) else min(finite)
    return [math.isfinite(v) and v == best for v in rounded]


def _value(tasks: Mapping[str, Any], task: str, model: str, metric: str) -> float:
    per_model = tasks.get(task)
    if not isinstance(per_model, Mapping) or not isinstance(per_model.get(model), Mapping):
        return math.nan
    return to_float(per_model[model].get(metric))


def _models(tasks: Mapping[str, Any]) -> list[str]:
    return model_order(m for pm in tasks.values() if isinstance(pm, Mapping) for m in pm)


def metric_table(tasks: Mapping[str, Mapping[str, Any]], metric: str, models: Sequence[str] | None = None,
                 mean_row: bool = True, majority: Mapping[str, float] | None = None) -> str:
    """Markdown table of one metric: rows tasks, columns models, the best of each row in bold.

    The ``mean`` row averages each model over all tasks; it is ``n/a`` for a model that lacks a
    finite value on any task (a mean over fewer tasks would not compare). ``majority``
    (``{TASK: rate}``) adds a last column ``majority class`` (never bold).
    """
    models = list(models) if models is not None else _models(tasks)
    rows = []
    grid = []
    for task in tasks:
        vals = [_value(tasks, task, m, metric) for m in models]
        grid.append(vals + [to_float((majority or {}).get(task))])
        rows.append([task] + _bold_row(vals, metric) + ([fmt_value(grid[-1][-1])] if majority else []))
    if mean_row and len(grid) > 1:
        arr = np.array(grid, dtype=float)
        means = [float(arr[:, j].mean()) if np.isfinite(arr[:, j]).all() else math.nan for j in range(arr.shape[1])]
        rows.append(["**mean**"] + _bold_row(means[:len(models)], metric) + ([fmt_value(means[-1])] if majority else []))
    return markdown_table(["task"] + models + (["majority class"] if majority else []), rows)


def interval_table(intervals: Mapping[str, Any], metric: str) -> str:
    """Markdown table of one metric's bootstrap intervals: rows tasks, columns models, cells
    ``"0.871 [0.830, 0.910]"`` (``n/a`` where a model has no interval)."""
    models = model_order(m for pm in intervals.values() for m in (pm or {}) if metric in (pm or {}).get(m, {}))
    rows = [[task] + [fmt_interval(((per_model or {}).get(m) or {}).get(metric)) for m in models]
            for task, per_model in intervals.items()]
    return markdown_table(["task"] + models, rows)


def _bold_row(vals: Sequence[float], metric: str) -> list[str]:
    return [f"**{fmt_value(v)}**" if b else fmt_value(v) for v, b in zip(vals, best_mask(vals, metric))]


# --------------------------------------------------------------------------------------------
# Histories
# --------------------------------------------------------------------------------------------


def load_histories(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The training histories of a run folder: ``{STAGE: [record, ...]}``.

    ``run_dir/STAGE/history.jsonl`` gives stage ``STAGE`` (the folder name), and a deeper one,
    such as the pipelines' ``run_dir/baselines/stl/breastmnist/history.jsonl``, the folder's path
    relative to ``run_dir`` (``"baselines/stl/breastmnist"``). ``run_dir/history.jsonl`` itself
    is split by each record's ``"stage"`` key (``"train"`` when absent), and its records come
    first when a stage appears in both. Stages are in sorted order.

    Raises:
        DataError: ``run_dir`` is not a folder, or a line of a history file is not a JSON object
            (the message names file and line).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    out: dict[str, list[dict[str, Any]]] = {}
    top = run_dir / "history.jsonl"
    if top.is_file():
        for rec in read_jsonl(top):
            out.setdefault(str(rec.get("stage", "train")), []).append(rec)
    for path in sorted(run_dir.rglob("history.jsonl")):
        if path.parent != run_dir:
            out.setdefault(path.parent.relative_to(run_dir).as_posix(), []).extend(read_jsonl(path))
    return {k: out[k] for k in sorted(out)}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """``obj`` with only YAML-safe types: tuples -> lists, paths and unknown objects -> str,
    numpy scalars/arrays -> Python numbers/lists."""
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def _fence(text: str, lang: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _metric_keys(metrics: Mapping[str, Any], tasks: Mapping[str, Any]) -> list[str]:
    keys = list(metrics.get("metric_keys") or [])
    if not keys:
        for pm in tasks.values():
            for vals in (pm or {}).values():
                if isinstance(vals, Mapping):
                    keys += [k for k in vals if k not in keys]
    return keys


def _mean_over_tasks(tasks: Mapping[str, Any], model: str, metric: str) -> float:
    vals = [_value(tasks, t, model, metric) for t in tasks]
    return float(np.mean(vals)) if vals and all(math.isfinite(v) for v in vals) else math.nan


def teacher_guard(metrics: Mapping[str, Any], primary: str) -> str | None:
    """The warning of the headline when the teacher is worse than the student trained without
    distillation (``student_nokd``) on the validation split, in the mean of ``primary`` over
    tasks; ``None`` when it is not, or when either is missing."""
    val = metrics.get("val")
    if not isinstance(val, Mapping) or not val:
        return None
    t, s = _mean_over_tasks(val, "teacher", primary), _mean_over_tasks(val, "student_nokd", primary)
    if not (math.isfinite(t) and math.isfinite(s)):
        return None
    if (t < s) if higher_is_better(primary) else (t > s):
        worse = [task for task in val if (_value(val, task, "teacher", primary) < _value(val, task, "student_nokd", primary))
                 == higher_is_better(primary)]
        return (f"**Warning:** the teacher is weaker than the student trained without distillation on validation "
                f"(mean {primary} {fmt_value(t)} vs {fmt_value(s)}; worse on {', '.join(worse)}): "
                "distillation is unlikely to help.")
    return None


def _counts(verdicts: Sequence[str]) -> str:
    n = [v for v in verdicts if v != "n/a"]
    return ", ".join(f"{word} on {sum(v == word for v in n)}" for word in ("beats", "ties", "is below")) + f" of {len(n)} task(s)"


def _summary(metrics: Mapping[str, Any], tasks: Mapping[str, Any], primary: str) -> list[str]:
    models = _models(tasks)
    descr = metrics.get("models") or {}
    out = ["## Summary", ""]
    kind = metrics.get("task_kind", "unknown")
    split = metrics.get("split", "test")
    out.append(f"- **Task kind:** {kind}; results on the **{split}** split; primary metric **{primary}** "
               f"({'higher' if higher_is_better(primary) else 'lower'} is better).")
    if models:
        out.append("- **Compared models:**")
        for m in models:
            out.append(f"  - `{m}`" + (f": {descr[m]}" if descr.get(m) else ""))
    teacher = metrics.get("teacher")
    if isinstance(teacher, Mapping) and teacher.get("description"):
        out.append(f"- **Teacher:** {teacher['description']}.")
    data = [d for d in (metrics.get("data") or []) if isinstance(d, Mapping)]
    if data:
        parts = [f"{d.get('name', '?')} ({d.get('n_train', 'n/a')} train"
                 + (f" (the teacher: {d['n_train_teacher']})" if "n_train_teacher" in d else "")
                 + f" / {d.get('n_val', 'n/a')} val / {d.get('n_test', 'n/a')} test)" for d in data]
        out.append(f"- **Data:** {len(data)} data set(s): " + "; ".join(parts) + ".")
    params = metrics.get("params") or {}
    pe, pt = to_float(params.get("expert")), to_float(params.get("teacher"))
    if math.isfinite(pe) and math.isfinite(pt) and pt > 0:
        out.append(f"- **Size:** one expert has {fmt_count(pe)} parameters, {100 * pe / pt:.1f}% of the "
                   f"teacher's {fmt_count(pt)} ({pt / pe:.1f}× smaller).")
    lat = metrics.get("latency_ms") or {}
    le, lt = to_float(lat.get("expert")), to_float(lat.get("teacher"))
    if math.isfinite(le) and math.isfinite(lt) and le > 0:
        out.append(f"- **Latency:** expert {le:.2f} ms vs teacher {lt:.2f} ms ({lt / le:.1f}× faster).")
    out.append("")

    guard = teacher_guard(metrics, primary)
    if guard:
        out += [guard, ""]
    stats = metrics.get("statistics") or {}
    intervals, differences = stats.get("intervals") or {}, stats.get("differences") or {}
    majority = metrics.get("majority") or {}
    show_majority = primary == "acc" and bool(majority)
    higher = higher_is_better(primary)
    rows, v_teacher, v_base = [], [], []
    for task in tasks:
        diffs = differences.get(task) or {}
        d_t, d_b = diffs.get("expert - teacher"), diffs.get("expert - best baseline")
        iv = (intervals.get(task) or {})
        cell = lambda m: (fmt_interval((iv.get(m) or {}).get(primary)) if (iv.get(m) or {}).get(primary)  # noqa: E731
                          else fmt_value(_value(tasks, task, m, primary)))
        vt, vb = verdict(d_t, higher), verdict(d_b, higher)
        v_teacher.append(vt)
        v_base.append(vb)
        base = (d_b or {}).get("baseline")
        row = [task, cell("expert")]
        if show_majority:
            row.append(fmt_value(to_float((majority.get(task) or {}).get(split))))
        row += [cell("teacher"), fmt_interval(d_t, signed=True), vt,
                f"{cell(base)} ({base})" if base else "n/a", fmt_interval(d_b, signed=True), vb]
        rows.append(row)
    out.append(f"**Headline ({primary}, {split} split):** per task, the expert against the teacher and against the "
               f"best baseline (chosen on the validation split among {', '.join(b for b in models if b not in NON_BASELINES) or 'none'}).")
    out.append("")
    header = ["task", "expert"] + (["majority class"] if show_majority else []) + [
        "teacher", "expert − teacher", "vs teacher", "best baseline", "expert − baseline", "vs baseline"]
    out.append(markdown_table(header, rows, align="lr" + ("r" if show_majority else "") + "rrlrrl"))
    out.append("")
    method = stats.get("method") or {}
    if differences:
        level = int(round(100 * float(method.get("level", 0.95))))
        out.append(f"The expert **{_counts(v_teacher)}** against the teacher, and **{_counts(v_base)}** against the "
                   f"best baseline. Cells are value [{level}% interval]; \"beats\" means the {level}% paired bootstrap "
                   f"interval of the difference lies above 0, \"is below\" below 0, \"ties\" that it contains 0 "
                   f"({method.get('n_resamples', 'n/a')} resamples of the test samples, seed {method.get('seed', 'n/a')}, "
                   "percentile method).")
    else:
        out.append("No per-sample test outputs (`statistics` in metrics.json): no interval, so no verdict.")
    if show_majority:
        out.append("")
        out.append(f"*Majority class*: the accuracy on the {split} split of always predicting the most frequent "
                   "class of the train split.")
    out.append("")
    return out


def headline_text(metrics: Mapping[str, Any]) -> str:
    """The report's headline as plain text for a terminal: per task the expert, the teacher and the
    best baseline (chosen on validation), each with its interval, and the verdicts of the paired
    differences; then the mean over tasks of every model."""
    primary, tasks = metrics["primary_metric"], metrics["tasks"]
    stats = metrics.get("statistics") or {}
    intervals, differences = stats.get("intervals") or {}, stats.get("differences") or {}
    higher = higher_is_better(primary)
    lines = [f"headline (test {primary}, value [95% interval]; best baseline chosen on validation):"]
    for task in tasks:
        iv, diffs = intervals.get(task) or {}, differences.get(task) or {}
        cell = lambda m: fmt_interval((iv.get(m) or {}).get(primary)) if m else "n/a"  # noqa: E731
        d_t, d_b = diffs.get("expert - teacher"), diffs.get("expert - best baseline")
        base = (d_b or {}).get("baseline")
        lines += [f"  {task}: expert {cell('expert')}, teacher {cell('teacher')}, best baseline {base} {cell(base)}",
                  f"  {'':{len(task)}}  expert - teacher {fmt_interval(d_t, signed=True)} {verdict(d_t, higher)}, "
                  f"expert - {base} {fmt_interval(d_b, signed=True)} {verdict(d_b, higher)}"]
    means = ", ".join(f"{m} {fmt_value(_mean_over_tasks(tasks, m, primary))}" for m in _models(tasks))
    return "\n".join(lines + [f"  mean over tasks: {means}"])


def _data_section(metrics: Mapping[str, Any]) -> list[str]:
    data = [d for d in (metrics.get("data") or []) if isinstance(d, Mapping)]
    out = ["## Data", ""]
    if not data:
        return out + ["No data description in metrics.json.", ""]
    cols = list(_DATA_COLUMNS) + [k for d in data for k in d if k not in _DATA_COLUMNS]
    cols = list(dict.fromkeys(cols))
    rows = [[("n/a" if d.get(c) is None else d.get(c)) for c in cols] for d in data]
    return out + [markdown_table(cols, rows, align="ll" + "r" * (len(cols) - 2)), ""]


def _results_section(title: str, tasks: Mapping[str, Any], keys: Sequence[str],
                     majority: Mapping[str, float] | None = None) -> list[str]:
    out = [title, ""]
    if not tasks:
        return out + ["No results.", ""]
    for key in keys:
        direction = "higher" if higher_is_better(key) else "lower"
        table = metric_table(tasks, key, majority=majority if key == "acc" else None)
        out += [f"### {key} ({direction} is better; best per row in bold)", "", table, ""]
        if key == "acc" and majority:
            out += ["*majority class*: accuracy of always predicting the train split's most frequent class.", ""]
    return out


def _majority(metrics: Mapping[str, Any], split: str) -> dict[str, float] | None:
    maj = metrics.get("majority")
    if not isinstance(maj, Mapping) or not maj:
        return None
    return {task: to_float((v or {}).get(split)) for task, v in maj.items()}


def _intervals_section(metrics: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    stats = metrics.get("statistics") or {}
    intervals = stats.get("intervals") or {}
    if not intervals:
        return []
    method = stats.get("method") or {}
    level = int(round(100 * float(method.get("level", 0.95))))
    out = [f"## {level}% bootstrap intervals ({metrics.get('split', 'test')} split)", "",
           f"Percentile intervals over {method.get('n_resamples', 'n/a')} resamples (with replacement) of the test "
           f"samples ({'cases' if metrics.get('task_kind') == 'segmentation' else 'images'}), seed "
           f"{method.get('seed', 'n/a')}; cells are value [low, high].", ""]
    for key in keys:
        if any(key in (pm or {}).get(m, {}) for pm in intervals.values() for m in (pm or {})):
            out += [f"### {key}", "", interval_table(intervals, key), ""]
    return out


def _structure_section(tasks: Mapping[str, Any]) -> list[str]:
    """Segmentation only: per task and model, the cases with a missed / spurious structure
    (keys ``missed``, ``spurious``, ``cases`` of :func:`lorkd.pipelines.recipes.segmentation.score_volumes`)."""
    models = [m for m in _models(tasks) if any(isinstance((tasks.get(t) or {}).get(m), Mapping)
                                               and "missed" in tasks[t][m] for t in tasks)]
    if not models:
        return []
    rows = []
    for task in tasks:
        cells = []
        for m in models:
            d = (tasks.get(task) or {}).get(m)
            if not isinstance(d, Mapping) or "missed" not in d:
                cells.append("n/a")
                continue
            cells.append(f"{fmt_count(d.get('missed'))} / {fmt_count(d.get('spurious'))} of {fmt_count(d.get('cases'))}")
        rows.append([task] + cells)
    return ["### Missed / spurious structures (case x class counts, of the cases; lower is better)", "",
            "A missed (in the label, not predicted) or spurious (predicted, not in the label) structure counts "
            "Dice 0 and HD95 = the image diagonal in mm; it is never dropped from the means.", "",
            markdown_table(["task"] + models, rows), ""]


def _cost_section(metrics: Mapping[str, Any]) -> list[str]:
    params = metrics.get("params") or {}
    flops = metrics.get("flops") or {}
    lat = metrics.get("latency_ms") or {}
    out = ["## Model size and cost", ""]
    names = model_order(list(params) + list(flops) + list(lat))
    if not names:
        return out + ["No size, FLOPs or latency measurements.", ""]
    rows = []
    for m in names:
        p = params.get(m)
        p_text = fmt_count(p) + (f" ({int(to_float(p)):,})" if math.isfinite(to_float(p)) else "")
        l_text = f"{to_float(lat.get(m)):.2f}" if math.isfinite(to_float(lat.get(m))) else "n/a"
        rows.append([m, p_text, _fmt_ratio(p, params.get("teacher")), fmt_count(flops.get(m)),
                     _fmt_ratio(flops.get(m), flops.get("teacher")), l_text,
                     _fmt_ratio(lat.get(m), lat.get("teacher"))])
    out.append(markdown_table(["model", "parameters", "× teacher", "FLOPs", "× teacher", "latency (ms)", "× teacher"],
                              rows))
    out += ["", "Ratios are model / teacher (below 1: smaller or faster than the teacher).", ""]
    return out


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _timing_section(metrics: Mapping[str, Any]) -> list[str]:
    timing = metrics.get("timing_s") or {}
    out = ["## Time per stage", ""]
    if not timing:
        return out + ["No timing recorded.", ""]
    vals = {k: to_float(v) for k, v in timing.items()}
    total = sum(v for v in vals.values() if math.isfinite(v))
    rows = []
    for k, v in vals.items():
        ok = math.isfinite(v)
        rows.append([k, f"{v:.1f}" if ok else "n/a", _hms(v) if ok else "n/a",
                     f"{100 * v / total:.1f}%" if ok and total > 0 else "n/a"])
    rows.append(["**total**", f"{total:.1f}", _hms(total), "100.0%" if total > 0 else "n/a"])
    return out + [markdown_table(["stage", "seconds", "h:mm:ss", "share"], rows), ""]


def _stages_section(metrics: Mapping[str, Any]) -> list[str]:
    """What each stage did in the command that wrote the report: trained, resumed, reused
    (from an earlier command, same config), reused with --reuse (config differs), or loaded."""
    stages = metrics.get("stages") or []
    if not stages:
        return []
    rows = [[s.get("stage", ""), s.get("status", ""), "; ".join(s.get("config_differs") or []) or "-"]
            for s in stages]
    return ["## Stages", "", markdown_table(["stage", "this command", "config differs (recorded -> now)"], rows, "lll"), ""]


def _ordered_histories(histories: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    order = list((metrics.get("timing_s") or {}).keys())
    names = [s for s in order if s in histories] + [s for s in histories if s not in order]
    return {s: histories[s] for s in names}


def _plots(run_dir: Path, metrics: Mapping[str, Any], keys: Sequence[str], primary: str,
           histories: Mapping[str, Any]) -> list[str]:
    out = ["## Plots", ""]
    plot_dir = run_dir / "plots"
    skipped = []
    for key in keys:
        try:
            p = plot_task_metrics(metrics, key, plot_dir / f"metric_{key}.png")
            out += [f"![{key} per task](plots/{p.name})", ""]
        except DataError as err:
            skipped.append(str(err))
    if size_points(metrics, primary):
        p = plot_size_vs_metric(metrics, primary, plot_dir / f"size_vs_{primary}.png")
        out += [f"![model size vs {primary}](plots/{p.name})", ""]
    else:
        skipped.append(f"size vs {primary}: no model has both a parameter count and a finite {primary}")
    if histories:
        try:
            p = plot_training_curves(histories, plot_dir / "training_curves.png")
            out += [f"![training curves](plots/{p.name})", ""]
        except DataError as err:
            skipped.append(str(err))
    else:
        skipped.append("training curves: no history.jsonl found")
    if skipped:
        out += ["Not plotted:", ""] + [f"- {s}" for s in skipped] + [""]
    return out


def write_report(run_dir: str | Path, metrics: Mapping[str, Any], config: Mapping[str, Any] | None,
                 histories: Mapping[str, list[Mapping[str, Any]]] | None = None, title: str | None = None) -> Path:
    """Write ``run_dir/report.md`` and its figures ``run_dir/plots/*.png``.

    Args:
        run_dir: the run folder (created if needed).
        metrics: the ``metrics.json`` dict (see :mod:`lorkd.report`); only ``"tasks"`` is required,
            every other section is written when its key is present.
        config: the config the run used, written verbatim as YAML (paths and unknown objects as
            strings, tuples as lists). ``None`` writes a note instead.
        histories: ``{STAGE: [record, ...]}``; ``None`` reads them with :func:`load_histories`.
        title: the report title (default ``"lorkd report: <task_kind>"``).

    Returns:
        The path of ``report.md`` (written atomically).

    Raises:
        DataError: ``metrics`` has no ``"tasks"`` mapping, or a history file is malformed.
    """
    run_dir = Path(run_dir)
    if not isinstance(metrics, Mapping) or not isinstance(metrics.get("tasks"), Mapping):
        raise DataError(f"{run_dir}: metrics has no 'tasks' mapping ({{TASK: {{MODEL: {{METRIC: float}}}}}})")
    run_dir.mkdir(parents=True, exist_ok=True)
    if histories is None:
        histories = load_histories(run_dir)
    histories = _ordered_histories(histories, metrics)
    tasks = metrics["tasks"]
    keys = _metric_keys(metrics, tasks)
    primary = metrics.get("primary_metric") or (keys[0] if keys else "acc")
    if primary not in keys:
        keys = [primary] + keys

    lines = [f"# {title or 'lorkd report: ' + str(metrics.get('task_kind', 'run'))}", ""]
    lines += _summary(metrics, tasks, primary)
    lines += _data_section(metrics)
    split = metrics.get("split", "test")
    lines += _results_section(f"## Results ({split} split)", tasks, keys, _majority(metrics, split))
    lines += _structure_section(tasks)
    lines += _intervals_section(metrics, keys)
    lines += routing_section(metrics)
    val = metrics.get("val")
    lines += _results_section("## Validation split", val if isinstance(val, Mapping) else {}, keys,
                              _majority(metrics, "val"))
    lines += search_section(run_dir)
    lines += _cost_section(metrics)
    lines += _timing_section(metrics)
    lines += _stages_section(metrics)
    lines += _plots(run_dir, metrics, keys, primary, histories)
    notes = metrics.get("notes") or []
    lines += ["## Notes", ""] + ([f"- {n}" for n in notes] if notes else ["None."]) + [""]
    machine = metrics.get("machine") or {}
    if machine:
        lines += ["## Machine", ""]
        lines += [f"- **{k}:** {v if isinstance(v, (str, numbers.Number)) else json.dumps(_plain(v))}"
                  for k, v in machine.items()] + [""]
    lines += ["## Config", ""]
    if config is None:
        lines += ["No config given.", ""]
    else:
        text = yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False, allow_unicode=True)
        lines += [_fence(text, "yaml"), ""]
    body = "\n".join(lines)
    return write_atomic(run_dir / "report.md", lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
