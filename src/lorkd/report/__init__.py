"""Reports of lorkd runs: markdown with tables and figures, and aggregation over seeds.

>>> from lorkd.report import write_report, load_histories, write_aggregate_report
>>> write_report("runs/demo", metrics, config)            # runs/demo/report.md + runs/demo/plots/*.png
>>> write_aggregate_report(["runs/s0", "runs/s1", "runs/s2"], "runs/summary.md")  # seeds only, else ConfigError

``metrics`` is the dict a pipeline writes to ``metrics.json``::

    {"task_kind": "classification" | "segmentation", "metric_keys": [...], "primary_metric": ...,
     "split": "test", "tasks": {TASK: {MODEL: {METRIC: float}}}, "val": {same shape},
     "params": {MODEL: int}, "flops": {MODEL: int}, "latency_ms": {MODEL: float},
     "timing_s": {STAGE: float}, "data": [{"name", "source", "num_classes", "channels",
     "n_train", "n_val", "n_test"}], "models": {MODEL: str}, "machine": {...}, "notes": [str],
     "majority": {TASK: {"class", "train", "val", "test"}},            # classification
     "statistics": {"method", "intervals", "differences"}}             # see lorkd.report.stats

Any subset of models may appear; missing or NaN values print ``n/a``.
"""

from .aggregate import aggregate_runs, config_differences, results_table_markdown, write_aggregate_report
from .markdown import load_histories, metric_table, write_report
from .plots import plot_size_vs_metric, plot_task_metrics, plot_training_curves

__all__ = [
    "aggregate_runs",
    "config_differences",
    "load_histories",
    "metric_table",
    "plot_size_vs_metric",
    "plot_task_metrics",
    "plot_training_curves",
    "results_table_markdown",
    "write_aggregate_report",
    "write_report",
]
