"""lorkd.report.compare: one model across groups of runs (paired by seed, on the same test items)."""

from __future__ import annotations

import numpy as np
import pytest

from lorkd.errors import DataError
from lorkd.report.compare import compare_groups, comparison_markdown
from lorkd.report.stats import save_predictions


def write_run(folder, correct_by_task, model="expert"):
    """A run folder whose ``model`` is right exactly on the items where ``correct`` is 1."""
    outputs = {}
    for task, correct in correct_by_task.items():
        labels = np.arange(len(correct)) % 2
        predicted = np.where(np.asarray(correct) == 1, labels, 1 - labels)
        outputs[task] = {model: {"probs": np.eye(2)[predicted].astype(np.float32), "labels": labels}}
    folder.mkdir(parents=True)
    save_predictions(folder, outputs)
    return folder


def test_means_sds_and_paired_differences(tmp_path):
    rng = np.random.default_rng(0)
    base = {t: (rng.random(400) < 0.7).astype(int) for t in ("a", "b")}
    better = {t: np.maximum(v, (rng.random(400) < 0.5).astype(int)) for t, v in base.items()}  # right wherever base is
    groups = {"random": [write_run(tmp_path / f"r{s}", base) for s in range(2)],
              "diverse": [write_run(tmp_path / f"d{s}", better) for s in range(2)],
              "same": [write_run(tmp_path / f"s{s}", base) for s in range(2)]}
    res = compare_groups(groups, n_resamples=500)
    a = res["tasks"]["a"]
    assert a["random"]["mean"] == pytest.approx(base["a"].mean()) and a["random"]["sd"] == 0.0
    assert a["random"]["low"] <= a["random"]["mean"] <= a["random"]["high"]
    assert a["diverse"]["diff"] == pytest.approx(better["a"].mean() - base["a"].mean())
    assert a["diverse"]["verdict"] == "beats" and a["diverse"]["diff_low"] > 0  # never worse on any item
    assert res["tasks"]["mean over tasks"]["same"]["diff"] == 0.0
    assert res["tasks"]["mean over tasks"]["same"]["verdict"] == "ties"
    assert "verdict" not in res["tasks"]["a"]["random"]
    text = comparison_markdown(res)
    assert "diverse − random" in text and "beats" in text and "mean over tasks" in text


def test_errors_name_the_problem(tmp_path):
    one = write_run(tmp_path / "one", {"a": [1, 0, 1, 1]})
    two = write_run(tmp_path / "two", {"a": [1, 0, 1]})
    with pytest.raises(DataError, match="same number of runs"):
        compare_groups({"x": [one], "y": [one, one]})
    with pytest.raises(DataError, match="two.*test items"):
        compare_groups({"x": [one], "y": [two]})
    with pytest.raises(DataError, match="no test probabilities of model 'student'"):
        compare_groups({"x": [one]}, model="student")
    with pytest.raises(DataError, match="file not found"):
        compare_groups({"x": [tmp_path / "nowhere"]})
