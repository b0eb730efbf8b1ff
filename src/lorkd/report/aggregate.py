"""Mean and spread of several runs (seeds) of the same recipe.

>>> agg = aggregate_runs([read_json(d / "metrics.json") for d in run_dirs])
>>> agg["tasks"]["breastmnist"]["expert"]["acc"]      # {"mean": 0.871, "std": 0.012, "n": 3}
>>> print(results_table_markdown(agg, "acc"))         # cells "0.871 ± 0.012"
>>> config_differences([cfg_seed0, cfg_seed1])        # {} : the runs differ in the seed only

``write_aggregate_report`` (the ``lorkd report`` command) refuses runs whose configs differ in
anything but the top-level ``seed``: it raises :class:`~lorkd.errors.ConfigError` listing every
differing dotted key with each run's value, unless ``allow_different=True``, and then the report
lists the differences at its top.

Statistics: ``std`` is the **sample** standard deviation (``ddof=1``, the unbiased variance
estimate over seeds), NaN when fewer than two values exist. Both are NaN-aware: missing, ``None``
and NaN values are left out, and ``n`` counts the finite values that entered (so a model that
ran on only some seeds has a smaller ``n``). An infinite value (an ``hd95`` of an empty
prediction) is also left out of mean and std but counted in ``n_inf``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lorkd.errors import ConfigError, DataError
from lorkd.fileio import read_json, write_atomic

from .markdown import best_mask, fmt_value, markdown_table, teacher_guard
from .plots import higher_is_better, model_order, to_float
from .stats import verdict

__all__ = ["aggregate_runs", "config_differences", "results_table_markdown", "write_aggregate_report"]

#: Config keys that may differ between runs that are aggregated.
SEED_KEYS = frozenset({"seed"})


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=float)
    fin = arr[np.isfinite(arr)]
    n = int(fin.size)
    return {
        "mean": float(fin.mean()) if n else math.nan,
        "std": float(fin.std(ddof=1)) if n >= 2 else math.nan,
        "n": n,
        "n_inf": int(np.isinf(arr).sum()),
    }


def _aggregate_split(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, dict[str, dict]]]:
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        split = run.get(key)
        if not isinstance(split, Mapping):
            continue
        for task, per_model in split.items():
            if not isinstance(per_model, Mapping):
                continue
            for model, vals in per_model.items():
                if not isinstance(vals, Mapping):
                    continue
                for metric, v in vals.items():
                    collected.setdefault(task, {}).setdefault(model, {}).setdefault(metric, []).append(to_float(v))
    return {task: {model: {metric: _stats(vs) for metric, vs in per_metric.items()}
                   for model, per_metric in per_model.items()}
            for task, per_model in collected.items()}


def aggregate_runs(metrics_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, sample std (``ddof=1``) and count per task / model / metric over several runs.

    Args:
        metrics_list: ``metrics.json`` dicts of runs of one recipe (different seeds).

    Returns:
        ``{"n_runs", "task_kind", "metric_keys", "primary_metric", "split",
        "tasks": {TASK: {MODEL: {METRIC: {"mean", "std", "n", "n_inf"}}}}, "val": same shape}``.
        Tasks and models are the union over runs; see the module docstring for NaN handling.

    Raises:
        DataError: the list is empty, an entry is not a dict with a ``"tasks"`` mapping, or the
            runs disagree on ``task_kind``.
    """
    if not metrics_list:
        raise DataError("aggregate_runs: no runs given")
    for i, m in enumerate(metrics_list):
        if not isinstance(m, Mapping) or not isinstance(m.get("tasks"), Mapping):
            raise DataError(f"aggregate_runs: run {i} has no 'tasks' mapping")
    kinds = {m.get("task_kind") for m in metrics_list if m.get("task_kind") is not None}
    if len(kinds) > 1:
        raise DataError(f"aggregate_runs: runs mix task_kind values {sorted(kinds)}")
    keys: list[str] = []
    for m in metrics_list:
        keys += [k for k in (m.get("metric_keys") or []) if k not in keys]
    first = metrics_list[0]
    return {
        "n_runs": len(metrics_list),
        "task_kind": next(iter(kinds), None),
        "metric_keys": keys,
        "primary_metric": first.get("primary_metric") or (keys[0] if keys else None),
        "split": first.get("split", "test"),
        "tasks": _aggregate_split(metrics_list, "tasks"),
        "val": _aggregate_split(metrics_list, "val"),
    }


def _fmt_stat(stat: Mapping[str, Any] | None, n_runs: int) -> str:
    if not stat or not stat.get("n"):
        return "n/a"
    text = fmt_value(stat["mean"])
    if stat["n"] >= 2:
        text += f" ± {fmt_value(stat['std'])}"
    if stat["n"] != n_runs:
        text += f" (n={stat['n']})"
    return text


def results_table_markdown(aggregated: Mapping[str, Any], metric: str, split: str = "tasks") -> str:
    """Markdown table of one metric over seeds: rows tasks, columns models, cells
    ``"0.871 ± 0.012"`` (mean ± sample std), the best mean of each row in bold.

    A cell built from a single value shows the mean alone; a cell built from fewer values than
    there are runs says how many: ``"0.871 ± 0.012 (n=2)"``. No value at all: ``n/a``.

    Raises:
        DataError: ``aggregated[split]`` is missing.
    """
    tasks = aggregated.get(split)
    if not isinstance(tasks, Mapping):
        raise DataError(f"results_table_markdown: aggregated has no '{split}' mapping")
    n_runs = int(aggregated.get("n_runs", 0))
    models = model_order(m for pm in tasks.values() for m in pm)
    rows = []
    for task, per_model in tasks.items():
        stats = [per_model.get(m, {}).get(metric) for m in models]
        means = [to_float(s["mean"]) if s else math.nan for s in stats]
        cells = [_fmt_stat(s, n_runs) for s in stats]
        rows.append([task] + [f"**{c}**" if b else c for c, b in zip(cells, best_mask(means, metric))])
    return markdown_table(["task"] + models, rows)


_MISSING = "<missing>"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": value}``: dotted keys of nested mappings and lists (list items by index)."""
    if isinstance(obj, Mapping):
        items = [(str(k), v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return {prefix: obj}
    if not items:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def config_differences(configs: Sequence[Mapping[str, Any]], ignore: frozenset[str] = SEED_KEYS) -> dict[str, list[Any]]:
    """The dotted keys whose values differ between ``configs`` (other than ``ignore``), each with
    the list of values, one per config (``"<missing>"`` where a config lacks the key)."""
    flat = [_flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    out = {}
    for key in keys:
        if key in ignore:
            continue
        values = [f.get(key, _MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out[key] = values
    return out


def _run_config(metrics: Mapping[str, Any], path: Path) -> Mapping[str, Any]:
    if isinstance(metrics.get("config"), Mapping):
        return metrics["config"]
    cfg_path = path.parent / "config.yaml"
    if cfg_path.is_file():
        return yaml.safe_load(cfg_path.read_text()) or {}
    raise DataError(f"{path}: no 'config' in it and no {cfg_path}, so the runs cannot be checked to differ in the "
                    "seed only (pass allow_different / --allow-different to aggregate anyway)")


def _fmt_differences(diffs: Mapping[str, list[Any]], paths: Sequence[Path]) -> list[str]:
    return [f"`{key}`: " + ", ".join(f"{p.parent.name or p}={v!r}" for p, v in zip(paths, values))
            for key, values in diffs.items()]


def _verdict_rows(runs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    tasks = list(dict.fromkeys(t for r in runs for t in ((r.get("statistics") or {}).get("differences") or {})))
    for task in tasks:
        row = [task]
        for name in ("expert - teacher", "expert - best baseline"):
            diffs = [((r.get("statistics") or {}).get("differences") or {}).get(task, {}).get(name) for r in runs]
            higher = higher_is_better(str(runs[0].get("primary_metric") or "acc"))
            verdicts = [verdict(d, higher) for d in diffs if d]
            stat = _stats([to_float(d.get("value")) for d in diffs if d])
            counts = ", ".join(f"{w} {verdicts.count(w)}" for w in ("beats", "ties", "is below") if verdicts.count(w))
            row += [_fmt_stat(stat, len(runs)), counts or "n/a"]
        rows.append(row)
    return rows


def write_aggregate_report(run_dirs: Sequence[str | Path], out_path: str | Path, allow_different: bool = False) -> Path:
    """Read ``metrics.json`` from each run folder (or a path to the file itself), aggregate them
    with :func:`aggregate_runs` and write a markdown report to ``out_path``.

    Args:
        run_dirs: run folders of one recipe that differ in the ``seed`` only.
        out_path: the markdown file to write.
        allow_different: aggregate runs whose configs differ in more than the seed; the report
            then lists the differences.

    Returns:
        ``out_path`` as a Path (written atomically).

    Raises:
        ConfigError: the configs differ in more than the seed and ``allow_different`` is false
            (the message lists every differing dotted key with each run's value).
        DataError: no run folder given, a ``metrics.json`` is missing or invalid, or a run has no
            config to compare (neither ``config`` in metrics.json nor ``config.yaml``).
    """
    if not run_dirs:
        raise DataError("write_aggregate_report: no run folders given")
    paths = [Path(d) / "metrics.json" if Path(d).is_dir() else Path(d) for d in run_dirs]
    runs = [read_json(p) for p in paths]
    diffs: dict[str, list[Any]] = {}
    if len(runs) > 1:
        try:
            diffs = config_differences([_run_config(r, p) for r, p in zip(runs, paths)])
        except DataError:
            if not allow_different:
                raise
            diffs = {"config": ["not recorded in every run"]}
    if diffs and not allow_different:
        raise ConfigError("lorkd report: the runs' configs differ in more than the seed, so their mean would mix "
                          "different recipes: " + "; ".join(_fmt_differences(diffs, paths))
                          + " (pass --allow-different to aggregate them anyway)")
    agg = aggregate_runs(runs)
    keys = list(agg["metric_keys"])
    if not keys:
        for per_model in agg["tasks"].values():
            for per_metric in per_model.values():
                keys += [k for k in per_metric if k not in keys]
    lines = [f"# lorkd: {agg['n_runs']} runs aggregated", ""]
    if diffs:
        lines += ["**Warning:** aggregated with `--allow-different`: the configs differ in more than the seed:", ""]
        lines += [f"- {d}" for d in _fmt_differences(diffs, paths)] + [""]
    primary = agg["primary_metric"] or "acc"
    means = {t: {m: {k: v["mean"] for k, v in pm.items()} for m, pm in per_model.items()}
             for t, per_model in agg["val"].items()}
    guard = teacher_guard({"val": means}, primary)
    if guard:
        lines += [guard + " (means over runs)", ""]
    lines += [f"Task kind: {agg['task_kind'] or 'unknown'}; primary metric: {agg['primary_metric'] or 'n/a'}.", "",
              "Cells are mean ± sample standard deviation (ddof=1) over runs; NaN values are left out and "
              "`(n=k)` marks a cell built from fewer runs than the total. Best mean per row in bold.", "",
              "Runs:", ""] + [f"- `{p}`" for p in paths] + [""]
    verdict_rows = _verdict_rows(runs)
    if verdict_rows:
        lines += [f"## Headline ({primary}, {agg['split']} split)", "",
                  "Per task: the expert's difference to the teacher and to the best baseline (chosen on validation "
                  "in each run), mean ± sd over runs, and how many runs' 95% paired bootstrap intervals say beats "
                  "/ ties / is below (see the single-run reports for the method).", "",
                  markdown_table(["task", "expert − teacher", "verdicts", "expert − best baseline", "verdicts"],
                                 verdict_rows, align="lrlrl"), ""]
    majority = _aggregate_split([{"m": {t: {"majority": v} for t, v in (r.get("majority") or {}).items()
                                       if isinstance(v, Mapping)}} for r in runs], "m")
    for title, split in ((f"## Results ({agg['split']} split)", "tasks"), ("## Validation split", "val")):
        if not agg[split]:
            continue
        lines += [title, ""]
        for key in keys:
            direction = "higher" if higher_is_better(key) else "lower"
            lines += [f"### {key} ({direction} is better)", "", results_table_markdown(agg, key, split), ""]
            rates = {t: (pm.get("majority") or {}).get(agg["split"] if split == "tasks" else "val") for t, pm in majority.items()}
            if key == "acc" and any(rates.values()):
                lines += ["Majority-class rate (always predicting the train split's most frequent class): "
                          + ", ".join(f"{t} {_fmt_stat(r, len(runs))}" for t, r in rates.items() if r) + ".", ""]
    body = "\n".join(lines)
    return write_atomic(out_path, lambda tmp: Path(tmp).write_text(body, encoding="utf-8"))
