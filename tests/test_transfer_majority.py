"""The transfer report warns when a method, or the teacher a method distils from, is at the test
majority-class rate, and says nothing otherwise (report data built by hand, nothing trained)."""

from __future__ import annotations

from pathlib import Path

from lorkd.report.transfer import majority_warnings, write_transfer_report

RATE = 0.435  # 87 of 200 test images in the majority class


def method(name: str, accs: list[float]) -> dict:
    mean = sum(accs) / len(accs)
    return {"method": name, "expert": None, "n_seeds": len(accs), "test_mean": mean, "test_sd": 0.0,
            "test_ci95": [mean - 0.01, mean + 0.01], "val_mean": 0.46, "trained_params": 1000,
            "deployed_params": 2000, "seconds_mean": 1.0, "test_auc_mean": 0.5,
            "seeds": {str(s): {"test": {"acc": a, "auc": 0.5}} for s, a in enumerate(accs)}}


def metrics(lp: list[float], kd: list[float], scratch: list[float]) -> dict:
    return {"task_kind": "classification", "primary_metric": "acc", "split": "test", "kind": "transfer",
            "foundation": {"source": "run", "tasks": ["ta"], "backbone": None, "params": 10_000, "experts": ["ta"],
                           "student": "ta"},
            "data": [{"name": "blood", "source": "blood.npz", "num_classes": 8, "channels": 3, "spatial_dims": 2,
                      "n_train": 500, "n_val": 100, "n_test": 200, "test_majority_rate": RATE}],
            "max_train": None, "seeds": [0, 1], "budget": {"epochs": 1, "batch_size": 8, "optim": "adamw", "lr": 1e-3},
            "bootstrap": {"resamples": 10, "method": "bootstrap"},
            "methods": {"blood": {"scratch": method("scratch", scratch), "foundation_lp": method("foundation_lp", lp),
                                  "kd": method("kd", kd)}}}


def test_method_and_teacher_at_the_majority_rate_are_warned(tmp_path: Path):
    m = metrics(lp=[RATE, RATE], kd=[0.60, 0.62], scratch=[0.52, 0.53])
    warned = majority_warnings(m)["blood"]
    assert len(warned) == 2
    assert "`foundation_lp`" in warned[0] and "0.435" in warned[0] and "majority" in warned[0]
    assert "`kd`" in warned[1] and "teacher `foundation_lp`" in warned[1] and "0.435" in warned[1]
    assert not any("`scratch`" in w for w in warned)
    report = write_transfer_report(tmp_path, m).read_text()
    assert all(w in report for w in warned)


def test_kd_at_the_rate_with_its_teacher_and_one_collapsed_seed(tmp_path: Path):
    m = metrics(lp=[RATE, RATE], kd=[RATE, RATE], scratch=[0.60, RATE])
    warned = majority_warnings(m)["blood"]
    kd = [w for w in warned if w.startswith("**Warning:** `kd`")]
    assert len(kd) == 1 and "0.435" in kd[0] and "Its teacher `foundation_lp` is at that rate too" in kd[0]
    scratch = [w for w in warned if "`scratch`" in w]
    assert len(scratch) == 1 and "seed(s) 1" in scratch[0]


def test_no_warning_above_the_majority_rate(tmp_path: Path):
    m = metrics(lp=[0.50, 0.52], kd=[0.60, 0.62], scratch=[0.52, 0.53])
    assert majority_warnings(m) == {"blood": []}
    report = write_transfer_report(tmp_path, m).read_text()
    assert "Warning" not in report and "majority-class rate 0.435" in report
    # segmentation has no majority rate: nothing to warn about
    assert majority_warnings({**m, "primary_metric": "dice"}) == {}
