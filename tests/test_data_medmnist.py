"""Tests for lorkd.data.medmnist: reading and checking MedMNIST-layout .npz files."""

from __future__ import annotations

import numpy as np
import pytest

from lorkd.data.medmnist import ClassificationTask, load_npz_task
from lorkd.data.paths import shared_data_dir
from lorkd.errors import DataError

COUNTS = {"train": 12, "val": 4, "test": 6}


def arrays(rgb: bool = False, label_shape: str = "column", num_classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for split, n in COUNTS.items():
        shape = (n, 8, 8, 3) if rgb else (n, 8, 8)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        out[f"{split}_labels"] = labels[:, None] if label_shape == "column" else labels
    return out


def write(tmp_path, name="tiny.npz", **arrs) -> str:
    path = tmp_path / name
    np.savez_compressed(path, **arrs)
    return str(path)


def test_loads_grayscale_with_column_labels(tmp_path):
    task = load_npz_task(write(tmp_path, **arrays()))
    assert isinstance(task, ClassificationTask)
    assert task.name == "tiny" and task.source.endswith("tiny.npz")
    assert task.num_classes == 3 and task.channels == 1
    assert task.splits == ("train", "val", "test")
    for split, n in COUNTS.items():
        assert task.images[split].shape == (n, 8, 8) and task.images[split].dtype == np.uint8
        assert task.labels[split].shape == (n,) and task.labels[split].dtype == np.int64
        assert task.num_samples(split) == n
    assert task.image_size == (8, 8)
    assert task.class_counts("train").tolist() == [4, 4, 4]


def test_loads_rgb_with_flat_labels_and_name(tmp_path):
    task = load_npz_task(write(tmp_path, **arrays(rgb=True, label_shape="flat")), name="derm")
    assert task.name == "derm" and task.channels == 3
    assert task.images["val"].shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(task.labels["val"], [0, 1, 2, 0])


def test_num_classes_given_and_too_small(tmp_path):
    path = write(tmp_path, **arrays(num_classes=3))
    assert load_npz_task(path, num_classes=5).num_classes == 5
    with pytest.raises(DataError, match=r"tiny\.npz.*'train'.*label 2 >= num_classes=2"):
        load_npz_task(path, num_classes=2)


def test_integer_and_float_images_are_converted(tmp_path):
    arrs = arrays()
    arrs["train_images"] = arrs["train_images"].astype(np.int32)
    arrs["val_images"] = arrs["val_images"].astype(np.float64)
    task = load_npz_task(write(tmp_path, **arrs))
    assert all(task.images[s].dtype == np.uint8 for s in COUNTS)
    np.testing.assert_array_equal(task.images["val"], arrays()["val_images"])


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.npz.*not found"):
        load_npz_task(tmp_path / "nothere.npz")


def test_truncated_file(tmp_path):
    path = tmp_path / "tiny.npz"
    write(tmp_path, **arrays())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="tiny.npz.*not a valid .npz"):
        load_npz_task(path)


def test_corrupt_member_inside_valid_zip(tmp_path):
    path = tmp_path / "tiny.npz"
    write(tmp_path, **arrays())
    data = bytearray(path.read_bytes())
    for i in range(200, 400):  # inside the first member's compressed data; directory stays intact
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="tiny.npz.*not a valid .npz"):
        load_npz_task(path)


def test_not_a_zip_and_npy_file(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello, not an archive\n")
    with pytest.raises(DataError, match="notes.npz"):
        load_npz_task(text)
    npy = tmp_path / "single.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(DataError, match="single.npy.*not an .npz"):
        load_npz_task(npy)


def test_missing_key(tmp_path):
    arrs = arrays()
    del arrs["val_labels"]
    with pytest.raises(DataError, match=r"tiny\.npz.*missing key.*val_labels"):
        load_npz_task(write(tmp_path, **arrs))


@pytest.mark.parametrize("shape", [(12, 64), (12, 8, 8, 3, 1, 1)])
def test_images_wrong_rank(tmp_path, shape):
    arrs = arrays()
    arrs["train_images"] = np.zeros(shape, np.uint8)
    with pytest.raises(DataError, match=r"tiny\.npz key 'train_images'.*3D.*4D"):
        load_npz_task(write(tmp_path, **arrs))


@pytest.mark.parametrize("bad", [np.full((4, 8, 8), 300.0), np.full((4, 8, 8), -1), np.full((4, 8, 8), np.nan),
                                 np.full((4, 8, 8), "a")])
def test_images_not_uint8_convertible(tmp_path, bad):
    arrs = arrays()
    arrs["val_images"] = bad
    with pytest.raises(DataError, match=r"tiny\.npz key 'val_images'.*uint8"):
        load_npz_task(write(tmp_path, **arrs))


def test_length_mismatch(tmp_path):
    arrs = arrays()
    arrs["test_labels"] = arrs["test_labels"][:-1]
    with pytest.raises(DataError, match=r"'test_images' holds 6 images but 'test_labels' holds 5"):
        load_npz_task(write(tmp_path, **arrs))


def test_empty_split(tmp_path):
    arrs = arrays()
    arrs["val_images"] = arrs["val_images"][:0]
    arrs["val_labels"] = arrs["val_labels"][:0]
    with pytest.raises(DataError, match=r"split 'val' is empty"):
        load_npz_task(write(tmp_path, **arrs))


def test_negative_labels(tmp_path):
    arrs = arrays()
    arrs["train_labels"] = -np.ones((12, 1), np.int64)
    with pytest.raises(DataError, match=r"'train_labels'.*>= 0.*-1"):
        load_npz_task(write(tmp_path, **arrs))


def test_multilabel_is_rejected(tmp_path):
    arrs = arrays()
    arrs["train_labels"] = np.zeros((12, 14), np.uint8)
    with pytest.raises(DataError, match=r"'train_labels'.*multi-label.*not supported"):
        load_npz_task(write(tmp_path, **arrs))


def test_non_integer_labels(tmp_path):
    arrs = arrays()
    arrs["val_labels"] = np.full((4, 1), 0.5)
    with pytest.raises(DataError, match=r"'val_labels'.*non-integer"):
        load_npz_task(write(tmp_path, **arrs))


def test_image_shape_differs_between_splits(tmp_path):
    arrs = arrays()
    arrs["test_images"] = np.zeros((6, 9, 9), np.uint8)
    with pytest.raises(DataError, match=r"differ between splits"):
        load_npz_task(write(tmp_path, **arrs))


def test_unknown_split_lookup(tmp_path):
    task = load_npz_task(write(tmp_path, **arrays()))
    with pytest.raises(DataError, match="no split 'holdout'"):
        task.num_samples("holdout")


@pytest.mark.realdata
@pytest.mark.parametrize(
    "rel, counts",
    [
        ("breastmnist/breastmnist.npz", (546, 78, 156)),
        ("pneumoniamnist/pneumoniamnist_reconstructed.npz", (4708, 524, 624)),
    ],
)
def test_real_medmnist_files(rel, counts):
    task = load_npz_task(shared_data_dir() / rel)
    assert task.num_classes == 2 and task.channels == 1
    assert tuple(task.num_samples(s) for s in ("train", "val", "test")) == counts
    for split in task.splits:
        assert task.images[split].shape[1:] == (28, 28) and task.images[split].dtype == np.uint8
        assert set(np.unique(task.labels[split])) == {0, 1}
