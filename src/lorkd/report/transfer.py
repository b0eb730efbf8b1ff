"""Summary, report and plot of ``lorkd transfer``.

Per downstream task and method: the test metric (accuracy and AUC; segmentation: mean foreground
Dice) as mean ± sd over seeds, a 95 % percentile-bootstrap interval of that mean, the validation
metric, trained and deployed parameters, and training time. The bootstrap (through
:func:`lorkd.report.stats.seed_mean_interval`) resamples the *test items* (images, or cases for
segmentation; the same resample for every seed) and recomputes the mean over seeds of the metric,
so the interval reflects the test set's size; with one seed it is the usual bootstrap interval of
that run's metric.

Classification: a method whose test accuracy (its mean over seeds, or any one seed) is at or below the
test majority-class rate (within one test item) has learnt nothing a constant would not; the report
warns about it, and about ``kd`` when its teacher (``foundation_lp``) is, as the recipes' report warns
about a weak teacher (:func:`lorkd.report.markdown.teacher_guard`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..engine import metrics as M
from ..fileio import write_atomic
from .stats import seed_mean_interval as bootstrap_interval  # the transfer report's interval
from .tables import fmt_value

#: The method whose model a method distils from (``kd`` from the ``foundation_lp`` model).
TEACHER_OF = {"kd": "foundation_lp"}

BOOTSTRAP_NOTE = ("95 % percentile bootstrap over test items (images; cases for segmentation) of the mean over "
                  "seeds (lorkd.report.stats, the same resampled items for every seed)")


def item_statistic(values: np.ndarray) -> float:
    """The metric from per-item values ``[n]`` (its mean: accuracy from 0/1) or ``[n, m]`` (per class:
    the mean over columns of each column's mean over its non-NaN rows; mean foreground Dice)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.nanmean(_as_items(values), axis=0)))


def _as_items(values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a




def _collapsed(m: dict[str, Any], rate: float, n_test: int) -> tuple[bool, list[str]]:
    """Whether the mean over seeds is at the majority rate, and the seeds that are (within one item)."""
    bar = rate + 1.0 / max(int(n_test), 1) - 1e-12
    seeds = [s for s, r in (m.get("seeds") or {}).items() if float((r.get("test") or {}).get("acc", np.inf)) <= bar]
    return float(m["test_mean"]) <= bar, seeds


def majority_warnings(metrics: dict[str, Any]) -> dict[str, list[str]]:
    """``{task: [warning, ...]}``: one per method at the test majority-class rate (mean over seeds or any
    seed, within one test item) and one per method whose teacher (:data:`TEACHER_OF`) is; empty lists
    for segmentation or when none is."""
    out: dict[str, list[str]] = {}
    if metrics.get("primary_metric") != "acc":
        return out
    for d in metrics.get("data") or []:
        rate, table, lines = d.get("test_majority_rate"), metrics["methods"].get(d["name"]) or {}, []
        if rate is None:
            continue
        at = {label: _collapsed(m, rate, d.get("n_test", 1)) for label, m in table.items()}
        for label, m in table.items():
            mean_at, seeds = at[label]
            teacher = TEACHER_OF.get(m.get("method", label))
            teacher_at = teacher in at and (at[teacher][0] or bool(at[teacher][1]))
            if not (mean_at or seeds or teacher_at):
                continue
            what = (f"test accuracy {fmt_value(m['test_mean'])} (mean over seeds)" if mean_at
                    else f"seed(s) {', '.join(seeds)}" if seeds else None)
            text = (f"**Warning:** `{label}` is at the test majority-class rate {fmt_value(rate)} ({what}): "
                    "it predicts (almost) only the most frequent class." if what else
                    f"**Warning:** `{label}`'s teacher `{teacher}` is at the test majority-class rate {fmt_value(rate)}: "
                    "there is nothing to distil.")
            if what and teacher_at:
                text += f" Its teacher `{teacher}` is at that rate too."
            lines.append(text)
        out[d["name"]] = lines
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def write_transfer_report(out: Path, metrics: dict[str, Any]) -> Path:
    """Write ``report.md`` and ``plots/transfer_<task>.png``; returns the report's path."""
    f = metrics["foundation"]
    lines = ["# lorkd transfer", "",
             f"Foundation: {f['source']}; "
             + (f"backbone `{f['backbone']['factory']}` " if f['backbone'] else "")
             + f"({_fmt_params(f['params'])} params), "
             f"decomposed on {', '.join(f['tasks'])}. Experts: {', '.join(f['experts'])}; student architecture "
             f"(scratch, kd, rd): the `{f['student']}` expert's.", "",
             f"Budget per method: {metrics['budget']['epochs']} epochs, batch {metrics['budget']['batch_size']}, "
             f"{metrics['budget']['optim']} lr {metrics['budget']['lr']}; selection on validation accuracy; test read "
             f"once. Seeds: {metrics['seeds']}. Training items per task: "
             + (f"at most {metrics['max_train']} (the same class-stratified subset for every method and seed)."
                if metrics["max_train"] else "all."), "",
             f"Intervals: {metrics['bootstrap']['method']}, {metrics['bootstrap']['resamples']} resamples. "
             "Trained: parameters that received gradients; deployed: parameters of the model that is run at "
             "inference (for `rd` the exported student). `kd` uses the `foundation_lp` model as its teacher "
             "(its time does not include that model's).", ""]
    key = metrics["primary_metric"]
    auc = key == "acc"
    warned = majority_warnings(metrics)
    for d in metrics["data"]:
        table = metrics["methods"][d["name"]]
        if auc:
            about = (f"{d['num_classes']} classes, {d['spatial_dims']}D, {d['channels']} channel(s); train {d['n_train']} / "
                     f"val {d['n_val']} / test {d['n_test']} images; test majority-class rate {d['test_majority_rate']:.3f}.")
        else:
            about = (f"{d['num_classes']} classes (background included), {d['spatial_dims']}D; train {d['n_train']} / "
                     f"val {d['n_val']} / test {d['n_test']} cases; Dice: mean over foreground classes, whole volumes.")
        lines += [f"## {d['name']}", "", f"{d['source']}: {about}", "",
                  f"| method | test {key} (mean ± sd) | 95 % CI |{' test AUC |' if auc else ''} val {key} | trained | deployed | time (s) |",
                  "|---|---|---|" + ("---|" if auc else "") + "---|---|---|---|"]
        if warned.get(d["name"]):
            lines[-2:-2] = [w for w in warned[d["name"]] for w in (w, "")]
        for label, m in table.items():
            lo, hi = m["test_ci95"]
            lines.append(f"| {label} | {m['test_mean']:.4f} ± {m['test_sd']:.4f} (n={m['n_seeds']}) | "
                         f"{lo:.4f} – {hi:.4f} |" + (f" {m['test_auc_mean']:.4f} |" if auc else "") + f" {m['val_mean']:.4f} | "
                         f"{_fmt_params(m['trained_params'])} | {_fmt_params(m['deployed_params'])} | {m['seconds_mean']:.1f} |")
        plot = plot_metric_vs_params(out / "plots" / f"transfer_{d['name']}.png", d["name"], table, key)
        lines += ["", f"![test {key} vs trained parameters]({plot.relative_to(out)})", ""]
    path = out / "report.md"
    write_atomic(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path


def plot_metric_vs_params(path: Path, task: str, table: dict[str, Any], metric: str = "acc") -> Path:
    """The test metric (mean, ± sd bars) against trained parameters (log scale), one point per method."""
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, m in table.items():
        ax.errorbar([m["trained_params"]], [m["test_mean"]], yerr=[m["test_sd"]], fmt="o", capsize=3)
        ax.annotate(label, (m["trained_params"], m["test_mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters")
    ax.set_ylabel("test accuracy" if metric == "acc" else f"test {metric}")
    ax.set_title(f"{task}: transfer")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path
