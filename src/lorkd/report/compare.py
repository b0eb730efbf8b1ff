"""One model compared across groups of runs that differ in one setting (e.g. how the training images
were chosen), each group holding the same seeds, on the same test items.

Each run folder holds ``predictions_test.npz`` (:func:`~lorkd.report.stats.save_predictions`). For
every task and group the test accuracy of ``model`` is given as the mean over the group's seeds,
the sample sd over seeds and a 95% bootstrap interval (test images resampled, the same images for
every seed); each group's difference from the reference group is paired: run ``i`` of a group is
compared with run ``i`` of the reference (the same seed when the groups list their seeds in the same
order), on the same resampled images. "beats" / "is below" when that interval excludes 0, as in
every lorkd report. The row "mean over tasks" resamples each task's images independently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import DataError
from .tables import markdown_table
from .stats import CONFIDENCE, N_RESAMPLES, PREDICTIONS, SEED, load_predictions

__all__ = ["compare_groups", "comparison_markdown"]


def _correct(run: Path, model: str) -> dict[str, np.ndarray]:
    """``{task: [n] float 0/1}``: whether ``model`` classified each test item of ``run`` correctly."""
    preds = load_predictions(run / PREDICTIONS)
    out = {}
    for task, models in preds.items():
        if model not in models or "probs" not in models[model]:
            raise DataError(f"{run / PREDICTIONS}: no test probabilities of model {model!r} for task {task!r} "
                            f"(models there: {sorted(models)})")
        arrays = models[model]
        out[task] = (arrays["probs"].argmax(1) == arrays["labels"]).astype(np.float64)
    return out


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def compare_groups(groups: Mapping[str, Sequence[str | Path]], model: str = "expert", reference: str | None = None,
                   n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = CONFIDENCE) -> dict:
    """The comparison of ``model`` across ``groups`` (``{label: [run folders]}``, the same number of
    runs in each; ``reference``: the label the others are compared with, default the first).

    Returns:
        ``{"model", "reference", "groups": {label: [folders]}, "tasks": {task | "mean over tasks":
        {label: {"mean", "sd", "low", "high", "diff", "diff_low", "diff_high", "verdict"}}}}``
        (accuracies in [0, 1]; the ``diff*`` keys and ``verdict`` are absent for the reference).

    Raises:
        DataError: groups of different sizes, an empty group, a run without ``predictions_test.npz``
            or without ``model``, or runs whose tasks or test items differ (names the folder).
    """
    labels = list(groups)
    reference = reference or labels[0]
    if reference not in groups:
        raise DataError(f"compare: the reference {reference!r} is not one of the groups {labels}")
    sizes = {label: len(runs) for label, runs in groups.items()}
    if min(sizes.values()) < 1 or len(set(sizes.values())) > 1:
        raise DataError(f"compare: every group needs the same number of runs (>= 1), got {sizes}")
    correct = {label: [_correct(Path(r), model) for r in runs] for label, runs in groups.items()}
    tasks = list(correct[reference][0])
    for label, runs in correct.items():
        for folder, per_task in zip(groups[label], runs):
            shapes = {t: len(v) for t, v in per_task.items()}
            if shapes != {t: len(v) for t, v in correct[reference][0].items()}:
                raise DataError(f"compare: {folder} has test items {shapes}, the reference's first run "
                                f"{ {t: len(v) for t, v in correct[reference][0].items()} }")
    rng = np.random.default_rng(seed)
    idx = {t: rng.integers(0, len(correct[reference][0][t]), size=(n_resamples, len(correct[reference][0][t])))
           for t in tasks}
    stacked = {label: {t: np.stack([run[t] for run in runs]) for t in tasks} for label, runs in correct.items()}  # [S, n]
    result: dict = {"model": model, "reference": reference, "groups": {k: [str(r) for r in v] for k, v in groups.items()},
                    "tasks": {}}
    per_task_samples: dict[str, dict[str, np.ndarray]] = {label: {} for label in labels}
    for t in tasks:
        row = {}
        for label in labels:
            x = stacked[label][t]
            accs = x.mean(axis=1)
            samples = x[:, idx[t]].mean(axis=2).mean(axis=0)  # [B]: mean over seeds of each resample's accuracy
            per_task_samples[label][t] = samples
            row[label] = {"mean": float(accs.mean()), "sd": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                          **dict(zip(("low", "high"), _interval(samples, level)))}
        result["tasks"][t] = row
    mean_row = {}
    for label in labels:
        samples = np.mean([per_task_samples[label][t] for t in tasks], axis=0)
        seed_means = np.mean([stacked[label][t].mean(axis=1) for t in tasks], axis=0)  # [S]
        mean_row[label] = {"mean": float(seed_means.mean()),
                           "sd": float(seed_means.std(ddof=1)) if len(seed_means) > 1 else 0.0,
                           **dict(zip(("low", "high"), _interval(samples, level)))}
    result["tasks"]["mean over tasks"] = mean_row
    for label in labels:
        if label == reference:
            continue
        for t in [*tasks, "mean over tasks"]:
            if t == "mean over tasks":
                diffs = np.mean([per_task_samples[label][u] - per_task_samples[reference][u] for u in tasks], axis=0)
            else:
                diffs = per_task_samples[label][t] - per_task_samples[reference][t]
            entry = result["tasks"][t][label]
            entry["diff"] = entry["mean"] - result["tasks"][t][reference]["mean"]
            entry["diff_low"], entry["diff_high"] = _interval(diffs, level)
            entry["verdict"] = ("beats" if entry["diff_low"] > 0 else "is below" if entry["diff_high"] < 0 else "ties")
    return result


def comparison_markdown(result: Mapping) -> str:
    """A markdown table of :func:`compare_groups`: one row per task (and the mean over tasks), per
    group ``mean ± sd [low, high]`` and, beside the reference, ``Δ [low, high] verdict``."""
    labels, ref = list(result["groups"]), result["reference"]
    header = ["task"] + [f"{label} (mean ± sd [95% CI])" for label in labels] + \
             [f"{label} − {ref} [95% CI]" for label in labels if label != ref]
    rows = []
    for task, row in result["tasks"].items():
        cells = [task] + [f"{row[g]['mean']:.3f} ± {row[g]['sd']:.3f} [{row[g]['low']:.3f}, {row[g]['high']:.3f}]"
                          for g in labels]
        cells += [f"{row[g]['diff']:+.3f} [{row[g]['diff_low']:+.3f}, {row[g]['diff_high']:+.3f}] {row[g]['verdict']}"
                  for g in labels if g != ref]
        rows.append(cells)
    n = len(next(iter(result["groups"].values())))
    intro = (f"Test accuracy of `{result['model']}`, {n} run(s) per group (seeds paired by position), "
             f"differences against `{ref}` paired on the same resampled test images.")
    return intro + "\n\n" + markdown_table(header, rows) + "\n"
