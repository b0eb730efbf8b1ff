"""Data checks before training (issue 12.2): labels, image dtypes and ranges, sizes, the backbone's
minimum input size; every error names the file and the config key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from lorkd import cli
from lorkd.data.medmnist import load_npz_task
from lorkd.data.multitask import MultiTaskDataset
from lorkd.data.paths import shared_data_dir
from lorkd.errors import DataError

from test_cli import TINY


def arrays(n=12, classes=2, shape=(16, 16), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for split in ("train", "val", "test"):
        data[f"{split}_images"] = rng.integers(0, 255, (n, *shape)).astype(dtype)
        data[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    return data


def run_with(tmp_path, tasks, *extra, command="run"):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**{k: v for k, v in TINY.items() if k != "data"}, "data": {"tasks": tasks}}))
    return cli.main([command, str(cfg), "--out", str(tmp_path / "out"), "--no-progress", *map(str, extra)])


def test_train_labels_shifted_by_five_are_refused_before_training(tmp_path, capsys):
    data = arrays()
    data["train_labels"] = data["train_labels"] + 5
    np.savez(tmp_path / "shifted.npz", **data)
    assert run_with(tmp_path, [{"name": "breast", "path": str(tmp_path / "shifted.npz")}]) == 2
    err = capsys.readouterr().err
    assert "data.tasks[0] (breast)" in err and "shifted.npz" in err and "'train_labels'" in err
    assert "'val_labels' holds classes [0, 1]" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing left behind


def test_inferred_classes_with_a_gap_are_refused(tmp_path):
    data = arrays()
    for split in ("train", "val", "test"):
        data[f"{split}_labels"] = data[f"{split}_labels"] * 2  # classes 0 and 2, never 1
    np.savez(tmp_path / "gap.npz", **data)
    with pytest.raises(DataError, match=r"gap\.npz: classes \[1\] occur in no split.*num_classes"):
        load_npz_task(tmp_path / "gap.npz")
    assert load_npz_task(tmp_path / "gap.npz", num_classes=3).num_classes == 3  # explicit: accepted


def test_image_dtypes_are_read_by_type(tmp_path):
    data = arrays()
    data["train_images"] = (data["train_images"].astype(np.uint16) * 257)  # 16-bit, full range
    floats = np.random.default_rng(1).random((12, 16, 16)).astype(np.float32)
    data["val_images"] = floats  # already in [0, 1]: kept, not divided by 255 again
    data["test_images"] = floats.astype(np.float64) * 255  # a 0-255 float scale: read as x / 255
    np.savez(tmp_path / "mixed.npz", **data)
    task = load_npz_task(tmp_path / "mixed.npz")
    np.testing.assert_allclose(task.images["train"], arrays()["train_images"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(task.images["val"], floats)
    np.testing.assert_allclose(task.images["test"], floats, atol=1e-6)
    ds = MultiTaskDataset([task], "val", mean=0.0, std=1.0)
    torch.testing.assert_close(ds[3][0][0], torch.from_numpy(floats[3]))
    ds = MultiTaskDataset([load_npz_task(tmp_path / "mixed.npz")], "train", mean=0.0, std=1.0)
    torch.testing.assert_close(ds[0][0][0], torch.from_numpy(arrays()["train_images"][0] / 255.0).float())


@pytest.mark.parametrize("bad, fragment", [
    (np.full((12, 16, 16), -0.5, np.float32), r"float images hold values in \[-0.5"),
    (np.full((12, 16, 16), 4095, np.int32), r"values in \[4095, 4095\].*uint16"),
])
def test_unreadable_image_ranges_name_file_and_key(tmp_path, bad, fragment):
    data = arrays()
    data["test_images"] = bad
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(DataError, match=r"bad\.npz key 'test_images'.*" + fragment):
        load_npz_task(tmp_path / "bad.npz")


def test_mixed_image_sizes_name_the_files_and_data_size(tmp_path, capsys):
    np.savez(tmp_path / "small.npz", **arrays(shape=(16, 16)))
    np.savez(tmp_path / "large.npz", **arrays(shape=(20, 20)))
    tasks = [{"name": "a", "path": str(tmp_path / "small.npz")}, {"name": "b", "path": str(tmp_path / "large.npz")}]
    assert run_with(tmp_path, tasks) == 2
    err = capsys.readouterr().err
    assert "small.npz): 16x16" in err and "large.npz): 20x20" in err and "data.size=20" in err


def test_missing_file_lists_the_places_searched(tmp_path, capsys):
    assert run_with(tmp_path, [{"name": "a", "path": "no/such.npz"}]) == 2
    err = capsys.readouterr().err
    assert "data.tasks[0].path" in err and "looked in" in err and str(shared_data_dir() / "no/such.npz") in err


def test_backbone_too_large_for_the_input_fails_before_training_with_a_hint(tmp_path, capsys):
    np.savez(tmp_path / "t.npz", **arrays(shape=(28, 28)))
    assert run_with(tmp_path, [{"name": "a", "path": str(tmp_path / "t.npz")}], "--set", "teacher.net.arch=densenet121",
                    command="pretrain") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "teacher.net.arch 'densenet121'" in err and "[28, 28]" in err
    assert "set data.size to at least" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "teacher").exists()
