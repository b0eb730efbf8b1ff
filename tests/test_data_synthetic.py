"""Tests for lorkd.data.synthetic: the embedded synthetic multi-modality data set."""

from __future__ import annotations

import time

import numpy as np
import torch
import pytest

from lorkd.data.synthetic import make_synthetic_tasks
from lorkd.errors import DataError


@pytest.fixture(scope="module")
def default_tasks():
    return make_synthetic_tasks()


def test_defaults_shapes_and_metadata(default_tasks):
    assert [t.name for t in default_tasks] == ["synth_ultrasound", "synth_xray", "synth_dermoscopy"]
    assert [t.num_classes for t in default_tasks] == [2, 3, 4]
    assert [t.channels for t in default_tasks] == [1, 1, 3]
    for task in default_tasks:
        assert task.source == "synthetic"
        for split, n in {"train": 600, "val": 150, "test": 300}.items():
            shape = (n, 28, 28) if task.channels == 1 else (n, 28, 28, 3)
            assert task.images[split].shape == shape and task.images[split].dtype == np.uint8
            assert task.labels[split].shape == (n,) and task.labels[split].dtype == np.int64
            assert task.labels[split].min() >= 0 and task.labels[split].max() < task.num_classes


def test_deterministic_for_seed():
    a, b = make_synthetic_tasks(seed=3, n_train=40, n_val=10, n_test=10), make_synthetic_tasks(
        seed=3, n_train=40, n_val=10, n_test=10)
    c = make_synthetic_tasks(seed=4, n_train=40, n_val=10, n_test=10)
    for ta, tb, tc in zip(a, b, c):
        for split in ta.splits:
            np.testing.assert_array_equal(ta.images[split], tb.images[split])
            np.testing.assert_array_equal(ta.labels[split], tb.labels[split])
            assert not np.array_equal(ta.images[split], tc.images[split])


def test_classes_balanced(default_tasks):
    for task in default_tasks:
        for split in task.splits:
            counts = task.class_counts(split)
            assert counts.min() >= 1 and counts.max() - counts.min() <= 1, (task.name, split, counts)


def test_labels_not_in_sorted_order(default_tasks):
    for task in default_tasks:
        labels = task.labels["train"]
        assert not np.array_equal(labels, np.sort(labels))
        assert not np.array_equal(labels, np.arange(len(labels)) % task.num_classes)


def test_tasks_and_splits_differ(default_tasks):
    means = [float(t.images["train"].mean()) for t in default_tasks]
    stds = [float(t.images["train"].std()) for t in default_tasks]
    # distinct appearance: mean/contrast differ pairwise
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert abs(means[i] - means[j]) > 5 or abs(stds[i] - stds[j]) > 5
    # the ultrasound's speckle is mild enough that the resampling of augmentation changes its texture
    # little (sd 1/3 gave mean squared neighbour differences of 0.058 augmented vs 0.168 plain)
    from lorkd.data.multitask import MultiTaskDataset

    def texture(augment: bool) -> float:
        data = MultiTaskDataset(default_tasks[:1], "train", augment=augment)
        x = torch.stack([data[i][0] for i in range(150)])
        return float(((x[..., 1:] - x[..., :-1]) ** 2).mean())

    assert texture(False) - texture(True) < 0.06
    for task in default_tasks:
        assert not np.array_equal(task.images["val"], task.images["test"][:150])


def test_labels_change_the_images(default_tasks):
    """Class-conditional mean images differ: the label is encoded in the pixels."""
    for task in default_tasks:
        imgs, labs = task.images["train"].astype(float), task.labels["train"]
        class_means = [imgs[labs == c].mean(0) for c in range(task.num_classes)]
        gaps = [np.abs(class_means[0] - m).mean() for m in class_means[1:]]
        assert min(gaps) > 0.5, (task.name, gaps)


def test_dermoscopy_is_rgb_with_colour(default_tasks):
    rgb = default_tasks[2].images["train"].astype(float)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 20


def test_more_tasks_cycle_modalities_with_unique_names():
    tasks = make_synthetic_tasks(num_tasks=6, size=16, n_train=8, n_val=4, n_test=4)
    names = [t.name for t in tasks]
    assert len(set(names)) == 6
    assert names[4] == "synth_ultrasound_2" and tasks[3].name == "synth_pathology"
    assert tasks[3].channels == 3 and tasks[3].num_classes == 3
    assert tasks[0].images["train"].shape == (8, 16, 16)
    assert not np.array_equal(tasks[0].images["train"], tasks[4].images["train"])


def test_fast_enough():
    start = time.perf_counter()
    make_synthetic_tasks()
    assert time.perf_counter() - start < 2.0  # spec: < 1 s on an idle core; margin for shared CPUs


@pytest.mark.parametrize("kwargs", [{"num_tasks": 0}, {"size": 4}, {"n_train": 0}, {"n_val": 1.5}, {"seed": -1}])
def test_bad_arguments(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(DataError, match=key):
        make_synthetic_tasks(**kwargs)
