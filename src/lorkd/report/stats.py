"""Statistics a reviewer accepts: bootstrap intervals, paired differences, majority-class rates.

>>> acc = bootstrap_interval(accuracy_stat, (probs, labels))          # {"value", "low", "high", ...}
>>> diff = paired_bootstrap_difference(accuracy_stat, (probs_e, labels), (probs_t, labels))
>>> verdict(diff)                                                     # "beats" | "ties" | "is below"

Method (documented in docs/reports.md):

* **Resampling.** ``N_RESAMPLES = 2000`` resamples of the test samples (classification: images;
  segmentation: cases) drawn with replacement, from ``numpy.random.default_rng(SEED)`` with
  ``SEED = 0``, so a report is reproducible to the digit.
* **Percentile interval.** The 95% interval is the 2.5th and 97.5th percentiles (numpy's linear
  interpolation) of the statistic over the resamples; the point ``value`` is the statistic on the
  original samples. A resample on which the statistic is undefined (an AUC of a resample that holds
  one class only; a Dice of a class absent from every resampled case) is left out and counted in
  ``n_undefined``.
* **Paired difference.** Model A − model B is resampled with the *same* indices for both models
  (the samples are shared), which removes the sample-to-sample variance both models see.
* **Verdict.** ``"beats"`` when the difference's interval lies above 0, ``"is below"`` when it lies
  below 0, otherwise ``"ties"`` (for metrics where lower is better the signs swap).

The statistics functions take the per-sample arrays a pipeline stores in
``predictions_test.npz`` (see :func:`save_predictions`): classification ``(probs [n, C], labels [n])``,
segmentation ``(dice [n_cases, C-1],)`` with NaN for a class absent from both prediction and label.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.engine import metrics as M
from lorkd.errors import DataError
from lorkd.fileio import write_atomic

__all__ = [
    "CONFIDENCE",
    "N_RESAMPLES",
    "SEED",
    "accuracy_stat",
    "auc_stat",
    "bootstrap_interval",
    "dice_stat",
    "load_predictions",
    "majority_rate",
    "paired_bootstrap_difference",
    "run_statistics",
    "save_predictions",
    "seed_mean_interval",
    "verdict",
]

#: Number of bootstrap resamples.
N_RESAMPLES = 2000
#: Seed of the resampling generator.
SEED = 0
#: Coverage of the intervals.
CONFIDENCE = 0.95

Stat = Callable[..., float]


def accuracy_stat(probs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of ``probs`` ``[n, C]`` (arg-max) against ``labels`` ``[n]``."""
    return float(np.mean(np.asarray(probs).argmax(1) == np.asarray(labels)))


def auc_stat(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (binary, or macro one-vs-rest) of ``probs`` ``[n, C]``; NaN when a class is missing."""
    return M.roc_auc(probs, labels)


def dice_stat(dice: np.ndarray) -> float:
    """Mean foreground Dice of per-case, per-class Dice ``[n_cases, C-1]`` computed as the
    segmentation pipeline does: per class the mean over cases (NaN entries left out), then the
    mean over classes. NaN when no entry is finite."""
    d = np.asarray(dice, dtype=np.float64)
    ok = np.isfinite(d)
    counts = ok.sum(0)
    if not counts.any():
        return math.nan
    per_class = np.where(ok, d, 0.0).sum(0)[counts > 0] / counts[counts > 0]
    return float(per_class.mean())


STATS: dict[str, Stat] = {"acc": accuracy_stat, "auc": auc_stat, "dice": dice_stat}


def _n(arrays: Sequence[np.ndarray]) -> int:
    if not arrays:
        raise DataError("bootstrap: no arrays given")
    n = int(np.asarray(arrays[0]).shape[0])
    for a in arrays:
        if int(np.asarray(a).shape[0]) != n:
            raise DataError(f"bootstrap: arrays disagree on the number of samples "
                            f"({[int(np.asarray(x).shape[0]) for x in arrays]})")
    if n == 0:
        raise DataError("bootstrap: got 0 samples")
    return n


def _indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    if n_resamples < 1:
        raise DataError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _interval(point: float, samples: np.ndarray, level: float, n_resamples: int) -> dict[str, Any]:
    if not 0 < level < 1:
        raise DataError(f"bootstrap: level must lie in (0, 1), got {level}")
    ok = samples[np.isfinite(samples)]
    tail = 100 * (1 - level) / 2
    low, high = (float(v) for v in np.percentile(ok, [tail, 100 - tail])) if ok.size else (math.nan, math.nan)
    return {"value": float(point), "low": low, "high": high, "level": level, "n_resamples": n_resamples,
            "n_undefined": int(samples.size - ok.size)}


def _fast_accuracy(arrays: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    correct = (np.asarray(arrays[0]).argmax(1) == np.asarray(arrays[1])).astype(np.float64)
    return correct[idx].mean(1)


def _weighted_binary_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC (ties count one half) of ``scores`` ``[n]`` for every row of sample
    multiplicities ``weights`` ``[B, n]`` (how often each sample occurs in a resample): ``[B]``,
    NaN for a row without a positive or a negative."""
    order = np.argsort(scores, kind="stable")
    s, pos, w = scores[order], positive[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores, ascending
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(w_neg, axis=1) - w_neg  # negative weight strictly below each group
    n_pos, n_neg = w_pos.sum(1), w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (w_pos * (below + 0.5 * w_neg)).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _fast_auc(arrays: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    """:func:`auc_stat` of every resample at once (the same numbers as calling it per resample)."""
    probs, labels = np.asarray(arrays[0], dtype=np.float64), np.asarray(arrays[1]).astype(np.int64)
    n = labels.shape[0]
    flat = (np.arange(idx.shape[0])[:, None] * n + idx).ravel()
    weights = np.bincount(flat, minlength=idx.shape[0] * n).reshape(idx.shape[0], n).astype(np.float64)
    if probs.shape[1] == 2:
        return _weighted_binary_auc(probs[:, 1], labels == 1, weights)
    per_class = [_weighted_binary_auc(probs[:, c], labels == c, weights) for c in range(probs.shape[1])]
    return np.mean(per_class, axis=0)  # NaN when a class is undefined, as roc_auc


def _resampled(stat: Stat, arrays: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    # vectorised forms of the two classification statistics: the same numbers as the loop, much faster
    if stat is accuracy_stat:
        return _fast_accuracy(arrays, idx)
    if stat is auc_stat and np.asarray(arrays[0]).ndim == 2:
        return _fast_auc(arrays, idx)
    arrays = [np.asarray(a) for a in arrays]
    return np.array([stat(*(a[i] for a in arrays)) for i in idx], dtype=np.float64)


def bootstrap_interval(stat: Stat, arrays: Sequence[np.ndarray], n_resamples: int = N_RESAMPLES, seed: int = SEED,
                       level: float = CONFIDENCE) -> dict[str, Any]:
    """Percentile bootstrap interval of ``stat(*arrays)``.

    Args:
        stat: a statistic of per-sample arrays (:func:`accuracy_stat`, :func:`auc_stat`,
            :func:`dice_stat` or any ``f(*arrays) -> float``).
        arrays: per-sample arrays sharing their first dimension ``n`` (resampled together).
        n_resamples, seed, level: see the module docstring.

    Returns:
        ``{"value", "low", "high", "level", "n_resamples", "n_undefined"}``; ``low``/``high`` are
        NaN when the statistic is undefined on every resample.

    Raises:
        DataError: no arrays, ``n == 0``, arrays of different lengths, ``n_resamples < 1`` or a
            level outside (0, 1).
    """
    n = _n(arrays)
    idx = _indices(n, n_resamples, seed)
    return _interval(stat(*arrays), _resampled(stat, arrays, idx), level, n_resamples)


def seed_mean_interval(per_item: Any, resamples: int = 1000, seed: int = 0, level: float = CONFIDENCE) -> tuple[float, float]:
    """:func:`bootstrap_interval` of the mean over seeds of a per-item metric (``lorkd transfer``).

    The *items* (images, or cases) are resampled, the same items for every seed, and the mean over
    seeds of the metric is recomputed on each resample.

    Args:
        per_item: ``[S, n]`` (e.g. 0/1: image ``i`` classified correctly by the run of seed ``s``) or
            ``[S, n, m]`` (e.g. Dice of case ``i`` and class ``m``, NaN where absent); the metric of
            one seed is the mean over columns of each column's mean over its non-NaN items.
        resamples: number of bootstrap resamples ``B``; 0 (or no item) gives ``(nan, nan)``.
        seed: of the resampling. level: coverage.

    Returns:
        ``(low, high)``: quantiles ``(1 - level) / 2`` and ``(1 + level) / 2`` of the ``B`` values.
    """
    x = np.asarray(per_item, dtype=np.float64)
    if resamples < 1 or x.size == 0:
        return float("nan"), float("nan")
    x = x[..., None] if x.ndim == 2 else x  # [S, n, m]
    out = bootstrap_interval(_mean_over_seeds, [np.moveaxis(x, 1, 0)], resamples, seed, level)  # items resampled
    return out["low"], out["high"]


def _mean_over_seeds(items: np.ndarray) -> float:
    """``[n, S, m]`` per-item values -> the mean over seeds of each seed's metric (the mean over
    classes of the per-class means over items, NaN entries left out)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = np.nanmean(items, axis=0)  # [S, m]
        return float(np.nanmean(per_class, axis=1).mean())


def paired_bootstrap_difference(stat: Stat, arrays_a: Sequence[np.ndarray], arrays_b: Sequence[np.ndarray],
                                n_resamples: int = N_RESAMPLES, seed: int = SEED,
                                level: float = CONFIDENCE) -> dict[str, Any]:
    """Percentile bootstrap interval of ``stat(*arrays_a) - stat(*arrays_b)`` on the same samples.

    Both models are resampled with the same indices (a paired bootstrap). Same return value and
    errors as :func:`bootstrap_interval`; also raises DataError when ``a`` and ``b`` hold a
    different number of samples.
    """
    n_a, n_b = _n(arrays_a), _n(arrays_b)
    if n_a != n_b:
        raise DataError(f"paired bootstrap: the two models were scored on {n_a} and {n_b} samples; "
                        "a paired difference needs the same samples")
    idx = _indices(n_a, n_resamples, seed)
    diffs = _resampled(stat, arrays_a, idx) - _resampled(stat, arrays_b, idx)
    return _interval(stat(*arrays_a) - stat(*arrays_b), diffs, level, n_resamples)


def verdict(diff: Mapping[str, Any] | None, higher_is_better: bool = True) -> str:
    """``"beats"`` when the interval of A − B lies wholly on the better side of 0, ``"is below"``
    when wholly on the worse side, ``"ties"`` when it contains 0; ``"n/a"`` without an interval."""
    if not diff:
        return "n/a"
    low, high = float(diff.get("low", math.nan)), float(diff.get("high", math.nan))
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    if not higher_is_better:
        low, high = -high, -low
    if low > 0:
        return "beats"
    if high < 0:
        return "is below"
    return "ties"


def majority_rate(train_labels: np.ndarray, num_classes: int,
                  other: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The majority class of the train split and the accuracy of always predicting it.

    Returns:
        ``{"class": k, "train": rate on train, <split>: rate on each split of ``other``}``.

    Raises:
        DataError: the train split is empty.
    """
    y = np.asarray(train_labels).reshape(-1).astype(np.int64)
    if y.size == 0:
        raise DataError("majority_rate: the train split is empty")
    counts = np.bincount(y, minlength=num_classes)
    k = int(counts.argmax())
    out: dict[str, Any] = {"class": k, "train": float(counts[k] / y.size)}
    for split, labels in (other or {}).items():
        lab = np.asarray(labels).reshape(-1)
        out[split] = float(np.mean(lab == k)) if lab.size else math.nan
    return out


# --------------------------------------------------------------------------------------------
# Per-sample outputs in the run folder
# --------------------------------------------------------------------------------------------

PREDICTIONS = "predictions_test.npz"


def save_predictions(run_dir: str | Path, outputs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]) -> Path:
    """Write ``run_dir/predictions_test.npz`` with keys ``"<task>/<model>/<name>"``.

    Args:
        outputs: ``{TASK: {MODEL: {"probs": [n, C], "labels": [n]} or {"dice": [n_cases, C-1]}}}``.
    """
    flat = {f"{task}/{model}/{name}": np.asarray(arr) for task, per_model in outputs.items()
            for model, arrays in per_model.items() for name, arr in arrays.items()}
    path = Path(run_dir) / PREDICTIONS

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **flat)

    return write_atomic(path, write)


def load_predictions(path: str | Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Read a file written by :func:`save_predictions` back into ``{TASK: {MODEL: {name: array}}}``.

    Raises:
        DataError: the file is missing or a key is not ``task/model/name``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            parts = key.rsplit("/", 2)
            if len(parts) != 3:
                raise DataError(f"{path}: key {key!r} is not 'task/model/name'")
            task, model, name = parts
            out.setdefault(task, {}).setdefault(model, {})[name] = data[key]
    return out


def _arrays(entry: Mapping[str, np.ndarray], metric: str) -> tuple[np.ndarray, ...] | None:
    if metric == "dice":
        return (entry["dice"],) if "dice" in entry else None
    return (entry["probs"], entry["labels"]) if "probs" in entry and "labels" in entry else None


def _best_on_val(val: Mapping[str, Any], task: str, candidates: Sequence[str], metric: str,
                 higher: bool) -> str | None:
    best, best_v = None, math.nan
    for m in candidates:
        v = (val.get(task, {}).get(m) or {}).get(metric)
        v = math.nan if v is None else float(v)
        if math.isfinite(v) and (best is None or (v > best_v if higher else v < best_v)):
            best, best_v = m, v
    return best


def run_statistics(outputs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], metric_keys: Sequence[str],
                   primary: str, val: Mapping[str, Any] | None = None, baselines: Sequence[str] = (),
                   n_resamples: int = N_RESAMPLES, seed: int = SEED, level: float = CONFIDENCE) -> dict[str, Any]:
    """Intervals per task / model / metric and the expert's paired differences, for ``metrics.json``.

    Args:
        outputs: per-sample test outputs (see :func:`save_predictions`).
        metric_keys: the metrics to bootstrap; those without a statistic here (``hd95``) are skipped.
        primary: the metric of the paired differences and of choosing the best baseline.
        val: the validation metrics ``{TASK: {MODEL: {METRIC: float}}}``; the best baseline of a
            task is the one with the best validation ``primary`` (never the test split).
        baselines: the names of the baseline models.

    Returns:
        ``{"method": ..., "intervals": {TASK: {MODEL: {METRIC: interval}}},
        "differences": {TASK: {"expert - teacher": interval, "expert - best baseline": interval
        (with "baseline": name)}}}``.
    """
    higher = primary not in ("hd95",)
    intervals: dict[str, Any] = {}
    differences: dict[str, Any] = {}
    for task, per_model in outputs.items():
        intervals[task] = {}
        for model, entry in per_model.items():
            for metric in metric_keys:
                arrays = _arrays(entry, metric) if metric in STATS else None
                if arrays is not None:
                    intervals[task].setdefault(model, {})[metric] = bootstrap_interval(
                        STATS[metric], arrays, n_resamples, seed, level)
        stat = STATS.get(primary)
        expert = _arrays(per_model.get("expert", {}), primary) if stat else None
        if expert is None:
            continue
        diffs: dict[str, Any] = {}
        teacher = _arrays(per_model.get("teacher", {}), primary)
        if teacher is not None:
            diffs["expert - teacher"] = paired_bootstrap_difference(stat, expert, teacher, n_resamples, seed, level)
        present = [b for b in baselines if _arrays(per_model.get(b, {}), primary) is not None]
        best = _best_on_val(val or {}, task, present, primary, higher)
        if best is not None:
            d = paired_bootstrap_difference(stat, expert, _arrays(per_model[best], primary), n_resamples, seed, level)
            diffs["expert - best baseline"] = {**d, "baseline": best}
        differences[task] = diffs
    return {"method": {"resampling": "bootstrap over test samples (segmentation: cases), with replacement",
                       "interval": "percentile", "n_resamples": n_resamples, "seed": seed, "level": level,
                       "best_baseline": f"best validation {primary}"},
            "intervals": intervals, "differences": differences}
