"""Tests of lorkd.report: markdown report, figures, histories, aggregation over seeds."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from lorkd.errors import DataError
from lorkd.errors import ConfigError
from lorkd.fileio import read_jsonl
from lorkd.report import (
    aggregate_runs,
    config_differences,
    load_histories,
    metric_table,
    plot_size_vs_metric,
    plot_task_metrics,
    plot_training_curves,
    results_table_markdown,
    write_aggregate_report,
    write_report,
)
from lorkd.report.markdown import headline_text, teacher_guard
from lorkd.report.plots import metric_axis_limits, size_points

NAN = float("nan")


def fake_metrics(shift: float = 0.0) -> dict:
    return {
        "task_kind": "classification",
        "metric_keys": ["acc", "auc"],
        "primary_metric": "acc",
        "split": "test",
        "tasks": {
            "breastmnist": {
                "teacher": {"acc": 0.850 + shift, "auc": 0.900},
                "expert": {"acc": 0.871 + shift, "auc": 0.910},
                "stl": {"acc": 0.840 + shift, "auc": NAN},
                "mtl_kd": {"acc": 0.861 + shift, "auc": 0.905},
            },
            "pneumoniamnist": {
                "teacher": {"acc": 0.900 + shift, "auc": 0.950},
                "expert": {"acc": 0.880 + shift, "auc": 0.940},
                "stl": {"acc": 0.890 + shift, "auc": 0.930},
                # mtl_kd missing on this task on purpose
            },
        },
        "val": {
            "breastmnist": {"teacher": {"acc": 0.80, "auc": 0.85}, "expert": {"acc": 0.82, "auc": NAN}},
            "pneumoniamnist": {"teacher": {"acc": 0.91, "auc": 0.96}, "expert": {"acc": 0.90, "auc": 0.95}},
        },
        "params": {"teacher": 23_500_000, "student": 1_400_000, "expert": 1_250_000, "stl": 1_250_000},
        "flops": {"teacher": 4_100_000_000, "expert": 150_000_000},
        "latency_ms": {"teacher": 20.0, "expert": 2.5},
        "timing_s": {"teacher": 120.0, "student": 60.0, "export": 3.0},
        "data": [
            {"name": "breastmnist", "source": "MedMNIST v2", "num_classes": 2, "channels": 1,
             "n_train": 546, "n_val": 78, "n_test": 156},
            {"name": "pneumoniamnist", "source": "MedMNIST v2", "num_classes": 2, "channels": 1,
             "n_train": 4708, "n_val": 524, "n_test": 624},
        ],
        "models": {"teacher": "ResNet-50 foundation model", "expert": "student + merged expert"},
        "machine": {"cpu": "test cpu", "torch": "2.x"},
        "notes": ["a note about this run"],
    }


def fake_config() -> dict:
    return {"seed": 0, "data": {"tasks": ["breastmnist", "pneumoniamnist"], "size": 28},
            "student": {"rank": 4, "alpha": 16.0, "norm": "shared"}, "kd": {"temperature": 4.0, "weight": 1.0}}


def write_histories(run_dir) -> None:
    for stage, keys in (("teacher", ("loss", "ce")), ("student", ("loss", "ce", "kd", "feat"))):
        (run_dir / stage).mkdir(parents=True)
        lines = []
        for epoch in range(1, 4):
            rec = {"epoch": epoch, "stage": stage, "lr": 0.05 / epoch, "seconds": 1.5}
            rec.update({k: 1.0 / epoch + i * 0.1 for i, k in enumerate(keys)})
            rec["val_acc"] = 0.7 + 0.05 * epoch
            lines.append(json.dumps(rec))
        (run_dir / stage / "history.jsonl").write_text("\n".join(lines) + "\n")


def assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 0  # not a blank canvas


def yaml_block(text: str) -> dict:
    m = re.search(r"```yaml\n(.*?)\n```", text, re.S)
    assert m, "no yaml block"
    return yaml.safe_load(m.group(1))


# --------------------------------------------------------------------------------------------


def test_write_report_full(tmp_path):
    run = tmp_path / "run"
    write_histories(run)
    path = write_report(run, fake_metrics(), fake_config())
    assert path == run / "report.md"
    text = path.read_text()

    for name in ("breastmnist", "pneumoniamnist", "teacher", "expert", "stl", "mtl_kd"):
        assert name in text
    assert "n/a" in text  # NaN auc of stl and the missing mtl_kd on pneumoniamnist
    stl_auc_row = [ln for ln in text.splitlines() if ln.startswith("| breastmnist |")]
    assert any("n/a" in ln for ln in stl_auc_row)
    # best acc per row in bold: expert on breastmnist, teacher on pneumoniamnist
    assert "| breastmnist | 0.850 | **0.871** | 0.840 | 0.861 |" in text
    assert "| pneumoniamnist | **0.900** | 0.880 | 0.890 | n/a |" in text
    # headline without per-sample outputs: no interval, so no verdict (never a "beats" by a point gap)
    assert "no interval, so no verdict" in text and "| beats |" not in text
    # sizes with ratios to the teacher, timing total, data, notes, machine
    assert "23.50M" in text and "0.0532×" in text and "0.125×" in text
    assert "183.0" in text and "0:03:03" in text
    assert "4708" in text and "MedMNIST v2" in text
    assert "a note about this run" in text and "test cpu" in text
    assert yaml_block(text) == fake_config()

    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert plots == ["metric_acc.png", "metric_auc.png", "size_vs_acc.png", "training_curves.png"]
    for name in plots:
        assert f"](plots/{name})" in text
        assert_png(run / "plots" / name)


def test_write_report_minimal_and_segmentation(tmp_path):
    metrics = {"task_kind": "segmentation", "metric_keys": ["dice", "hd95"], "primary_metric": "dice",
               "tasks": {"prostate": {"teacher": {"dice": 0.80, "hd95": 5.0},
                                      "expert": {"dice": 0.80, "hd95": 4.0},
                                      "unet_x": {"dice": NAN, "hd95": float("inf")}}}}
    path = write_report(tmp_path / "seg", metrics, {"out": tmp_path, "sizes": (1, 2)}, histories={}, title="Seg run")
    text = path.read_text()
    assert text.startswith("# Seg run")
    assert "| prostate | 5.000 | **4.000** | inf |" in text  # hd95: lower is better
    assert "training curves: no history.jsonl found" in text
    assert "size vs dice" in text  # no params: not plotted, and said so
    assert yaml_block(text) == {"out": str(tmp_path), "sizes": [1, 2]}
    assert sorted(p.name for p in (tmp_path / "seg" / "plots").glob("*.png")) == ["metric_dice.png", "metric_hd95.png"]


def with_statistics(metrics: dict) -> dict:
    """``metrics`` with intervals, majority rates and validation results of baselines."""
    iv = lambda v, lo, hi: {"value": v, "low": lo, "high": hi, "level": 0.95, "n_resamples": 2000}  # noqa: E731
    metrics["majority"] = {"breastmnist": {"class": 1, "train": 0.731, "val": 0.731, "test": 0.731},
                           "pneumoniamnist": {"class": 1, "train": 0.742, "val": 0.742, "test": 0.625}}
    metrics["val"]["breastmnist"].update({"stl": {"acc": 0.70}, "mtl_kd": {"acc": 0.78}, "student_nokd": {"acc": 0.90}})
    metrics["val"]["pneumoniamnist"].update({"stl": {"acc": 0.92}, "student_nokd": {"acc": 0.93}})
    metrics["statistics"] = {
        "method": {"n_resamples": 2000, "seed": 0, "level": 0.95, "interval": "percentile"},
        "intervals": {"breastmnist": {"expert": {"acc": iv(0.871, 0.82, 0.92)}, "teacher": {"acc": iv(0.85, 0.80, 0.90)},
                                      "mtl_kd": {"acc": iv(0.861, 0.81, 0.91)}},
                      "pneumoniamnist": {"expert": {"acc": iv(0.88, 0.85, 0.91)}, "stl": {"acc": iv(0.89, 0.86, 0.92)}}},
        "differences": {"breastmnist": {"expert - teacher": iv(0.021, 0.004, 0.04),
                                        "expert - best baseline": {**iv(0.01, -0.02, 0.03), "baseline": "mtl_kd"}},
                        "pneumoniamnist": {"expert - teacher": iv(-0.02, -0.035, -0.006),
                                           "expert - best baseline": {**iv(-0.01, -0.03, 0.01), "baseline": "stl"}}}}
    return metrics


def test_headline_says_beats_ties_below_from_intervals_and_warns_about_a_weak_teacher(tmp_path):
    text = write_report(tmp_path / "run", with_statistics(fake_metrics()), None, histories={}).read_text()
    # expert − teacher: [0.004, 0.04] excludes 0 above -> beats; [-0.035, -0.006] below -> is below
    assert ("| breastmnist | 0.871 [0.820, 0.920] | 0.731 | 0.850 [0.800, 0.900] | +0.021 [+0.004, +0.040] | beats "
            "| 0.861 [0.810, 0.910] (mtl_kd) | +0.010 [-0.020, +0.030] | ties |") in text
    assert "| -0.020 [-0.035, -0.006] | is below |" in text and "(stl) | -0.010 [-0.030, +0.010] | ties |" in text
    assert "**beats on 1, ties on 0, is below on 1 of 2 task(s)** against the teacher" in text
    assert "**beats on 0, ties on 2, is below on 0 of 2 task(s)** against the best baseline" in text
    # the guard: the teacher (mean val acc 0.855) is below the student without KD (0.915)
    assert ("**Warning:** the teacher is weaker than the student trained without distillation on validation "
            "(mean acc 0.855 vs 0.915; worse on breastmnist, pneumoniamnist): distillation is unlikely to help.") in text
    # the majority class next to accuracy; the interval table
    assert "| task | teacher | expert | stl | mtl_kd | majority class |" in text
    assert "| pneumoniamnist | **0.900** | 0.880 | 0.890 | n/a | 0.625 |" in text
    assert "## 95% bootstrap intervals (test split)" in text and "0.890 [0.860, 0.920]" in text


def test_headline_text_gives_expert_teacher_best_baseline_with_intervals_and_the_means():
    lines = headline_text(with_statistics(fake_metrics())).splitlines()
    assert lines[1] == ("  breastmnist: expert 0.871 [0.820, 0.920], teacher 0.850 [0.800, 0.900], "
                        "best baseline mtl_kd 0.861 [0.810, 0.910]")
    assert lines[2].split() == ["expert", "-", "teacher", "+0.021", "[+0.004,", "+0.040]", "beats,", "expert", "-",
                                "mtl_kd", "+0.010", "[-0.020,", "+0.030]", "ties"]
    assert lines[3].startswith("  pneumoniamnist: expert 0.880 [0.850, 0.910], teacher n/a, best baseline stl")
    assert "teacher -0.020 [-0.035, -0.006] is below" in lines[4]
    # means over both tasks; mtl_kd lacks a task: no mean
    assert lines[5] == "  mean over tasks: teacher 0.875, expert 0.875, stl 0.865, mtl_kd n/a"


def test_no_guard_when_the_teacher_is_at_least_as_good(tmp_path):
    m = with_statistics(fake_metrics())
    for task in m["val"].values():
        task["student_nokd"]["acc"] = 0.5
    assert teacher_guard(m, "acc") is None
    m["val"]["pneumoniamnist"]["student_nokd"]["acc"] = 0.99  # worse on one task only, but not in the mean
    assert teacher_guard(m, "acc") is None
    del m["val"]["breastmnist"]["student_nokd"]  # a mean over fewer tasks would not compare: no guard
    assert teacher_guard(m, "acc") is None


def test_axis_limits_do_not_exaggerate_small_gaps():
    assert metric_axis_limits("acc", [0.871, 0.873], majority=0.731) == (pytest.approx(0.711), 1.0)
    assert metric_axis_limits("acc", [0.871, 0.873]) == (0.0, 1.0)
    assert metric_axis_limits("acc", [0.40, 0.9], majority=0.731) == (pytest.approx(0.38), 1.0)  # never cut a bar
    assert metric_axis_limits("auc", [0.95, 0.951]) == (pytest.approx(0.48), 1.0)
    assert metric_axis_limits("dice", [0.8]) == (0.0, 1.0)
    assert metric_axis_limits("hd95", [4.0, 10.0]) == (0.0, pytest.approx(11.5))


def test_size_plot_has_every_model_with_a_size(tmp_path):
    m = with_statistics(fake_metrics())
    m["params"].update({"mtl_kd": 1_300_000})
    assert [p[0] for p in size_points(m, "acc")] == ["teacher", "expert", "stl", "mtl_kd"]
    assert_png(plot_size_vs_metric(m, "acc", tmp_path / "size.png"))
    assert_png(plot_task_metrics(m, "acc", tmp_path / "acc.png"))


def test_write_report_rejects_metrics_without_tasks(tmp_path):
    with pytest.raises(DataError, match="tasks"):
        write_report(tmp_path, {"task_kind": "classification"}, {})


def test_metric_table_mean_row_needs_all_tasks():
    table = metric_table(fake_metrics()["tasks"], "acc")
    mean_row = [ln for ln in table.splitlines() if ln.startswith("| **mean** |")][0]
    cells = [c.strip() for c in mean_row.strip("|").split("|")]
    assert cells[1:] == ["**0.875**", "**0.875**", "0.865", "n/a"]  # teacher, expert tie; mtl_kd lacks a task


# --------------------------------------------------------------------------------------------


def test_load_histories(tmp_path):
    write_histories(tmp_path)
    (tmp_path / "history.jsonl").write_text(
        json.dumps({"epoch": 1, "stage": "probe", "loss": 1.0}) + "\n" + '{"epoch": 2, "sta')  # cut short
    nested = tmp_path / "baselines" / "stl" / "breastmnist"
    nested.mkdir(parents=True)
    (nested / "history.jsonl").write_text(json.dumps({"epoch": 1, "loss": 0.5, "val/acc": 0.8}) + "\n")
    hist = load_histories(tmp_path)
    assert list(hist) == ["baselines/stl/breastmnist", "probe", "student", "teacher"]
    assert hist["baselines/stl/breastmnist"][0]["val/acc"] == 0.8
    assert len(hist["teacher"]) == 3 and hist["student"][0]["kd"] == pytest.approx(1.2)
    assert hist["probe"] == [{"epoch": 1, "stage": "probe", "loss": 1.0}]


def test_load_histories_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "history.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(DataError, match=r"history.jsonl:2"):
        load_histories(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_histories(tmp_path / "missing")


def test_plots_cope_with_missing_models_and_nan(tmp_path):
    metrics = fake_metrics()
    p = plot_task_metrics(metrics, "auc", tmp_path / "a" / "b" / "auc.png")
    assert p == tmp_path / "a" / "b" / "auc.png"
    assert_png(p)
    assert_png(plot_size_vs_metric(metrics, "auc", tmp_path / "size.png"))
    hist = {"only_lr": [{"epoch": 1, "lr": 0.1}],  # nothing to draw: skipped
            "s": [{"loss": 2.0, "val/dice": 0.3}, {"loss": 1.0, "val/dice": None, "note": "x"}]}
    assert_png(plot_training_curves(hist, tmp_path / "curves.png"))
    with pytest.raises(DataError, match="dice"):
        plot_task_metrics(metrics, "dice", tmp_path / "none.png")
    with pytest.raises(DataError, match="params"):
        plot_size_vs_metric({"tasks": metrics["tasks"]}, "acc", tmp_path / "none.png")
    with pytest.raises(DataError):
        plot_training_curves({"x": [{"epoch": 1}]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# --------------------------------------------------------------------------------------------


def test_aggregate_matches_numpy():
    runs = [fake_metrics(0.0), fake_metrics(0.01), fake_metrics(-0.03)]
    runs[2]["tasks"]["breastmnist"]["expert"]["acc"] = NAN  # NaN-aware
    del runs[1]["tasks"]["breastmnist"]["mtl_kd"]
    agg = aggregate_runs(runs)
    assert agg["n_runs"] == 3 and agg["metric_keys"] == ["acc", "auc"] and agg["primary_metric"] == "acc"

    t = agg["tasks"]["pneumoniamnist"]["teacher"]["acc"]
    vals = np.array([0.90, 0.91, 0.87])
    assert t["n"] == 3
    assert t["mean"] == pytest.approx(vals.mean()) and t["std"] == pytest.approx(vals.std(ddof=1))
    assert t["std"] == pytest.approx(0.02081666, abs=1e-7)

    e = agg["tasks"]["breastmnist"]["expert"]["acc"]
    assert e["n"] == 2
    assert e["mean"] == pytest.approx(np.mean([0.871, 0.881])) and e["std"] == pytest.approx(np.std([0.871, 0.881], ddof=1))

    m = agg["tasks"]["breastmnist"]["mtl_kd"]["acc"]
    assert m["n"] == 2 and m["mean"] == pytest.approx(np.mean([0.861, 0.831]))
    s = agg["tasks"]["breastmnist"]["stl"]["auc"]  # NaN in every run
    assert s["n"] == 0 and math.isnan(s["mean"]) and math.isnan(s["std"])
    v = agg["val"]["breastmnist"]["expert"]["acc"]
    assert v["n"] == 3 and v["std"] == pytest.approx(0.0, abs=1e-12)

    single = aggregate_runs([fake_metrics()])["tasks"]["breastmnist"]["expert"]["acc"]
    assert single["n"] == 1 and math.isnan(single["std"])


def test_aggregate_rejects_bad_input():
    with pytest.raises(DataError, match="no runs"):
        aggregate_runs([])
    seg = fake_metrics()
    seg["task_kind"] = "segmentation"
    with pytest.raises(DataError, match="task_kind"):
        aggregate_runs([fake_metrics(), seg])


def test_results_table_markdown_cells():
    runs = [fake_metrics(0.0), fake_metrics(0.012), fake_metrics(-0.012)]
    runs[2]["tasks"]["breastmnist"]["expert"]["acc"] = NAN
    table = results_table_markdown(aggregate_runs(runs), "acc")
    lines = table.splitlines()
    assert lines[0] == "| task | teacher | expert | stl | mtl_kd |"
    row = [ln for ln in lines if ln.startswith("| pneumoniamnist |")][0]
    assert f"**0.900 ± {np.std([0.9, 0.912, 0.888], ddof=1):.3f}**" in row
    assert "| n/a |" in row  # mtl_kd never ran on this task
    brow = [ln for ln in lines if ln.startswith("| breastmnist |")][0]
    assert "**0.877 ± 0.008 (n=2)**" in brow


def test_write_aggregate_report(tmp_path):
    dirs = []
    for i, shift in enumerate((0.0, 0.01)):
        d = tmp_path / f"seed{i}"
        d.mkdir()
        metrics = with_statistics(fake_metrics(shift))
        metrics["config"] = {**fake_config(), "seed": i}
        (d / "metrics.json").write_text(json.dumps(metrics))  # NaN is written as NaN
        dirs.append(d)
    out = write_aggregate_report(dirs, tmp_path / "agg" / "summary.md")
    text = out.read_text()
    assert "2 runs aggregated" in text and "ddof=1" in text and "allow-different" not in text
    assert "| breastmnist | 0.021 ± 0.000 | beats 2 | 0.010 ± 0.000 | ties 2 |" in text
    assert "Majority-class rate" in text and "pneumoniamnist 0.625" in text
    assert "**Warning:** the teacher is weaker" in text
    assert "breastmnist" in text and "mtl_kd" in text and "n/a" in text
    assert f"0.876 ± {np.std([0.871, 0.881], ddof=1):.3f}" in text
    assert "## Validation split" in text
    with pytest.raises(DataError, match="not found"):
        write_aggregate_report([tmp_path / "nothing"], tmp_path / "x.md")


def test_config_differences_and_refusal_to_aggregate_different_recipes(tmp_path):
    base = {"seed": 0, "student": {"train": {"epochs": 8, "optim": {"lr": 0.05}}}, "data": {"tasks": [{"name": "a"}]}}
    other = json.loads(json.dumps(base))
    other["seed"] = 1
    assert config_differences([base, other]) == {}
    other["student"]["train"]["epochs"] = 10
    other["data"]["tasks"].append({"name": "b"})
    assert config_differences([base, other]) == {"student.train.epochs": [8, 10],
                                                 "data.tasks.1.name": ["<missing>", "b"]}
    dirs = []
    for i, cfg in enumerate((base, other)):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({**fake_metrics(), "config": cfg}))
        dirs.append(d)
    with pytest.raises(ConfigError, match=r"`student.train.epochs`: r0=8, r1=10; `data.tasks.1.name`: "
                                          r"r0='<missing>', r1='b' \(pass --allow-different"):
        write_aggregate_report(dirs, tmp_path / "s.md")
    assert not (tmp_path / "s.md").exists()
    text = write_aggregate_report(dirs, tmp_path / "s.md", allow_different=True).read_text()
    assert "**Warning:** aggregated with `--allow-different`" in text and "`student.train.epochs`: r0=8, r1=10" in text
    # a run without any config cannot be checked: refused, unless allowed
    (dirs[1] / "metrics.json").write_text(json.dumps(fake_metrics()))
    with pytest.raises(DataError, match="config"):
        write_aggregate_report(dirs, tmp_path / "s.md")


def test_read_jsonl_is_the_one_reader_of_history_files(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"epoch": 0}\n\n{"epoch": 1}\n{"epoch": 2, "cut')  # a last line cut short by a crash
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    path.write_text('{"epoch": 0}\n[1]\n')
    with pytest.raises(DataError, match="history.jsonl:2: expected a JSON object"):
        read_jsonl(path)
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "none.jsonl")
