"""Tests of lorkd.report.stats: bootstrap intervals, paired differences, verdicts, majority rates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorkd.errors import DataError
from lorkd.report import stats as S


def onehot(pred, num_classes=2):
    p = np.full((len(pred), num_classes), 0.1 / (num_classes - 1))
    p[np.arange(len(pred)), pred] = 0.9
    return p


def test_all_correct_and_all_wrong_give_degenerate_intervals():
    y = np.array([0, 1] * 50)
    right = S.bootstrap_interval(S.accuracy_stat, (onehot(y), y))
    assert (right["value"], right["low"], right["high"]) == (1.0, 1.0, 1.0)
    wrong = S.bootstrap_interval(S.accuracy_stat, (onehot(1 - y), y))
    assert (wrong["value"], wrong["low"], wrong["high"]) == (0.0, 0.0, 0.0)
    assert right["n_resamples"] == S.N_RESAMPLES == 2000 and right["level"] == 0.95


def test_accuracy_interval_contains_estimate_and_matches_the_normal_width():
    y = np.zeros(400, dtype=int)
    pred = np.zeros(400, dtype=int)
    pred[:100] = 1  # 300 of 400 right: accuracy 0.75
    iv = S.bootstrap_interval(S.accuracy_stat, (onehot(pred), y))
    assert iv["value"] == 0.75 and iv["low"] < 0.75 < iv["high"]
    se = math.sqrt(0.75 * 0.25 / 400)  # binomial standard error: the width is about 2 * 1.96 * se
    assert abs((iv["high"] - iv["low"]) - 2 * 1.96 * se) < 0.01
    assert abs((iv["low"] + iv["high"]) / 2 - 0.75) < 0.01
    # the vectorised accuracy path gives the same numbers as the generic per-resample loop
    slow = S.bootstrap_interval(lambda p, t: S.accuracy_stat(p, t), (onehot(pred), y), n_resamples=300)
    fast = S.bootstrap_interval(S.accuracy_stat, (onehot(pred), y), n_resamples=300)
    assert (slow["low"], slow["high"]) == (fast["low"], fast["high"])


def test_seeded_determinism():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    p = rng.dirichlet([1, 1, 1], 120)
    a = S.bootstrap_interval(S.auc_stat, (p, y), n_resamples=200, seed=7)
    b = S.bootstrap_interval(S.auc_stat, (p, y), n_resamples=200, seed=7)
    c = S.bootstrap_interval(S.auc_stat, (p, y), n_resamples=200, seed=8)
    assert a == b and (a["low"], a["high"]) != (c["low"], c["high"])
    assert a["low"] <= a["value"] <= a["high"]


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_vectorised_auc_equals_roc_auc_per_resample(num_classes):
    rng = np.random.default_rng(num_classes)
    y = rng.integers(0, num_classes, 40)
    p = np.round(rng.dirichlet([1] * num_classes, 40), 1)  # rounded: many tied scores
    idx = rng.integers(0, 40, (60, 40))
    idx[0] = np.where(y == 0)[0][0]  # one resample holding a single class: undefined
    fast = S._resampled(S.auc_stat, (p, y), idx)
    slow = np.array([S.auc_stat(p[i], y[i]) for i in idx])
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert np.isnan(fast[0])


def test_undefined_auc_resamples_are_left_out_and_counted():
    y = np.array([0, 0, 0, 0, 1])
    p = onehot(y)
    iv = S.bootstrap_interval(S.auc_stat, (p, y), n_resamples=500)
    # a resample without the one positive has no AUC: about (4/5)^5 = 33% of them
    assert 100 < iv["n_undefined"] < 250
    assert iv["low"] == iv["high"] == 1.0


def test_paired_difference_and_verdicts():
    y = np.array([0, 1] * 100)
    good, bad = onehot(y), onehot(1 - y)
    diff = S.paired_bootstrap_difference(S.accuracy_stat, (good, y), (bad, y))
    assert (diff["value"], diff["low"], diff["high"]) == (1.0, 1.0, 1.0) and S.verdict(diff) == "beats"
    assert S.verdict(S.paired_bootstrap_difference(S.accuracy_stat, (bad, y), (good, y))) == "is below"
    same = S.paired_bootstrap_difference(S.accuracy_stat, (good, y), (good, y))
    assert (same["low"], same["high"]) == (0.0, 0.0) and S.verdict(same) == "ties"
    # two models that differ on 2 of 200 samples, one each way: the interval holds 0
    a, b = y.copy(), y.copy()
    a[0], b[1] = 1 - a[0], 1 - b[1]
    d = S.paired_bootstrap_difference(S.accuracy_stat, (onehot(a), y), (onehot(b), y))
    assert d["value"] == 0.0 and d["low"] < 0 < d["high"] and S.verdict(d) == "ties"
    # lower-is-better metrics swap the sides; no interval: n/a
    assert S.verdict({"low": -2.0, "high": -1.0}, higher_is_better=False) == "beats"
    assert S.verdict(None) == "n/a" and S.verdict({"low": math.nan, "high": 1.0}) == "n/a"
    with pytest.raises(DataError, match="same samples"):
        S.paired_bootstrap_difference(S.accuracy_stat, (good, y), (good[:10], y[:10]))


def test_bad_inputs_raise():
    with pytest.raises(DataError, match="0 samples"):
        S.bootstrap_interval(S.accuracy_stat, (np.zeros((0, 2)), np.zeros(0)))
    with pytest.raises(DataError, match="disagree"):
        S.bootstrap_interval(S.accuracy_stat, (np.zeros((3, 2)), np.zeros(2)))
    with pytest.raises(DataError, match="level"):
        S.bootstrap_interval(S.accuracy_stat, (np.zeros((3, 2)), np.zeros(3)), level=95)


def test_dice_stat_is_the_pipeline_mean_and_bootstraps_cases():
    dice = np.array([[0.8, np.nan], [0.6, 0.4], [1.0, 0.2]])
    # class 1: mean(0.8, 0.6, 1.0) = 0.8; class 2: mean(0.4, 0.2) = 0.3; mean 0.55
    assert S.dice_stat(dice) == pytest.approx(0.55)
    assert math.isnan(S.dice_stat(np.full((2, 2), np.nan)))
    iv = S.bootstrap_interval(S.dice_stat, (dice,), n_resamples=400)
    assert iv["low"] <= 0.55 <= iv["high"] and iv["high"] - iv["low"] > 0


def test_majority_rate():
    m = S.majority_rate(np.array([1, 1, 1, 0]), 3, {"test": np.array([1, 0, 2, 2]), "val": np.array([])})
    assert m["class"] == 1 and m["train"] == 0.75 and m["test"] == 0.25 and math.isnan(m["val"])
    with pytest.raises(DataError):
        S.majority_rate(np.array([]), 2)


def test_run_statistics_picks_the_best_baseline_on_validation(tmp_path):
    y = np.array([0, 1] * 60)
    flip = lambda k: onehot(np.where(np.arange(len(y)) < k, 1 - y, y))  # noqa: E731  k samples wrong
    outputs = {"t": {"expert": {"probs": flip(10), "labels": y}, "teacher": {"probs": flip(40), "labels": y},
                     "stl": {"probs": flip(0), "labels": y}, "mtl": {"probs": flip(30), "labels": y}}}
    val = {"t": {"stl": {"acc": 0.70}, "mtl": {"acc": 0.90}}}  # mtl best on val though stl is best on test
    path = S.save_predictions(tmp_path, outputs)
    loaded = S.load_predictions(path)
    np.testing.assert_array_equal(loaded["t"]["stl"]["labels"], y)
    res = S.run_statistics(loaded, ["acc", "auc", "hd95"], "acc", val, ["stl", "mtl"], n_resamples=300)
    d = res["differences"]["t"]
    assert d["expert - best baseline"]["baseline"] == "mtl"
    assert d["expert - best baseline"]["value"] == pytest.approx(20 / 120)
    assert S.verdict(d["expert - teacher"]) == "beats"
    assert set(res["intervals"]["t"]["expert"]) == {"acc", "auc"}  # no statistic for hd95
    assert res["method"]["n_resamples"] == 300 and res["method"]["interval"] == "percentile"


def test_seed_mean_interval_is_the_bootstrap_of_the_mean_over_seeds():
    rng = np.random.default_rng(3)
    x = (rng.random((1, 60)) < 0.7).astype(float)  # one seed: the usual bootstrap of the accuracy
    lo, hi = S.seed_mean_interval(x, 300, seed=4)
    iv = S.bootstrap_interval(lambda a: float(a.mean()), [x[0]], n_resamples=300, seed=4)
    assert (lo, hi) == pytest.approx((iv["low"], iv["high"]))
    two = np.concatenate([x, 1 - x])  # two seeds: their mean is 0.5 on every resample
    assert S.seed_mean_interval(two, 200) == pytest.approx((0.5, 0.5))
    assert all(math.isnan(v) for v in S.seed_mean_interval(x, 0))
