"""Tests for lorkd.data.synthetic: the embedded synthetic multi-modality data set."""

from __future__ import annotations

import time

import numpy as np
import torch
import pytest

from lorkd.data.synthetic import HARD_MODALITIES, make_synthetic_tasks
from lorkd.errors import ConfigError, DataError


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


@pytest.mark.parametrize("kwargs", [{"num_tasks": 0}, {"size": 4}, {"n_train": 0}, {"n_val": 1.5}, {"seed": -1},
                                    {"family": "medium"}])
def test_bad_arguments(kwargs):
    key = next(iter(kwargs))
    with pytest.raises(DataError, match=key):
        make_synthetic_tasks(**kwargs)


# ------------------------------------------------------------------------------ the hard family
@pytest.fixture(scope="module")
def hard_tasks():
    return make_synthetic_tasks(family="hard")


def test_hard_family_keeps_names_and_looks_and_leaves_the_default_alone(default_tasks, hard_tasks):
    assert [t.name for t in hard_tasks] == [t.name for t in default_tasks]
    assert [t.channels for t in hard_tasks] == [1, 1, 3]
    assert [t.num_classes for t in make_synthetic_tasks(4, 16, 8, 4, 4, family="hard")] == [4, 4, 4, 3]
    for basic, explicit, hard in zip(default_tasks, make_synthetic_tasks(family="basic"), hard_tasks):
        for split in basic.splits:
            np.testing.assert_array_equal(basic.images[split], explicit.images[split])
            assert hard.images[split].shape == basic.images[split].shape and hard.images[split].dtype == np.uint8
            assert not np.array_equal(basic.images[split], hard.images[split])
    # the same modality look: mean brightness within 25 grey levels of the basic family's
    for basic, hard in zip(default_tasks, hard_tasks):
        assert abs(float(basic.images["train"].mean()) - float(hard.images["train"].mean())) < 25


def test_hard_family_deterministic_for_seed_and_balanced(hard_tasks):
    kw = dict(num_tasks=4, size=20, n_train=30, n_val=9, n_test=7, family="hard")
    a, b, c = make_synthetic_tasks(seed=3, **kw), make_synthetic_tasks(seed=3, **kw), make_synthetic_tasks(seed=4, **kw)
    for ta, tb, tc in zip(a, b, c):
        for split in ta.splits:
            np.testing.assert_array_equal(ta.images[split], tb.images[split])
            np.testing.assert_array_equal(ta.labels[split], tb.labels[split])
            assert not np.array_equal(ta.images[split], tc.images[split])
    for task in hard_tasks + a:
        for split in task.splits:
            counts = task.class_counts(split)
            assert counts.min() >= 1 and counts.max() - counts.min() <= 1, (task.name, split, counts)


@pytest.mark.parametrize("modality", HARD_MODALITIES, ids=lambda m: m[0])
def test_hard_cue_is_present_small_local_and_moves(modality):
    """With one generator state (the same nuisance draws) and clean images, an image of class c
    differs from its class-0 twin by the cue alone: in every image, in a few per cent of the pixels,
    at a place that varies, and far less than two images of one class differ by their nuisance."""
    _, _, num_classes, generate = modality
    n, size = 120, 28
    twin = {c: generate(np.random.default_rng(5), np.full(n, c), size, clean=True).astype(float)
            for c in range(num_classes)}
    nuisance = np.abs(twin[0] - generate(np.random.default_rng(6), np.zeros(n, np.int64), size, clean=True)).mean()
    grey = lambda img: img.mean(-1) if img.ndim == 4 else img  # noqa: E731
    for c in range(1, num_classes):
        diff = grey(np.abs(twin[c] - twin[0]))
        per_image = diff.reshape(n, -1).mean(1)
        assert per_image.min() > 0.05, (c, per_image.min())  # the cue is in every image
        assert per_image.mean() < 0.15 * nuisance, (c, per_image.mean(), nuisance)  # and subtle
        assert (diff.reshape(n, -1) > 2).mean(1).max() < 0.35  # and local
        ys, xs = np.mgrid[:size, :size]
        weight = diff / diff.sum((1, 2), keepdims=True)
        centre = np.stack([(weight * ys).sum((1, 2)), (weight * xs).sum((1, 2))], 1)
        assert centre.std(0).min() > 1.5, (c, centre.std(0))  # its place varies (pixels)
        for d in range(1, c):  # each class has its own cue
            assert np.abs(twin[c] - twin[d]).reshape(n, -1).mean(1).min() > 0.05


def test_hard_labels_are_not_in_the_mean_image(default_tasks, hard_tasks):
    """Nuisance dominates: a nearest-class-mean classifier on the pixels is near chance on the hard
    family (0.64-0.67 on the basic one with 1500 images), and the images' brightness varies within a class."""
    def nearest_mean(task):
        x, y = task.images["train"].reshape(task.num_samples("train"), -1).astype(float), task.labels["train"]
        means = np.stack([x[y == c].mean(0) for c in range(task.num_classes)])
        xv = task.images["val"].reshape(task.num_samples("val"), -1).astype(float)
        return float((((xv[:, None] - means[None]) ** 2).sum(-1).argmin(1) == task.labels["val"]).mean())

    for basic, hard in zip(default_tasks, hard_tasks):
        assert nearest_mean(hard) < 1 / hard.num_classes + 0.15 < nearest_mean(basic), hard.name
        x, y = hard.images["train"].astype(float), hard.labels["train"]
        brightness = x.reshape(len(x), -1).mean(1)
        assert min(brightness[y == c].std() for c in range(hard.num_classes)) > 5, hard.name


def test_config_selects_the_family_and_names_a_bad_one():
    from lorkd.config import from_dict
    from lorkd.pipelines.recipes.classification import load_image_tasks
    from lorkd.pipelines.schema import ClassificationConfig

    data = {"synthetic": {"num_tasks": 2, "size": 12, "n_train": 16, "n_val": 8, "n_test": 8}}
    assert from_dict(ClassificationConfig, {"data": data}).data.synthetic.family == "basic"
    hard = load_image_tasks(from_dict(ClassificationConfig, {"data": {"synthetic": {**data["synthetic"], "family": "hard"}}}))
    expected = make_synthetic_tasks(2, 12, 16, 8, 8, family="hard")
    assert [t.num_classes for t in hard] == [4, 4]
    np.testing.assert_array_equal(hard[1].images["train"], expected[1].images["train"])
    with pytest.raises(ConfigError, match=r"data\.synthetic\.family: 'medium' is not one of 'basic', 'hard'"):
        from_dict(ClassificationConfig, {"data": {"synthetic": {"family": "medium"}}})
