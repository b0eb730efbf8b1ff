"""Seeded augmentation of segmentation patches: image and label together, determinism, configs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorkd.data.augment import Augment
from lorkd.errors import ConfigError

OFF = dict(flip=0.0, affine=0.0, intensity=0.0)


def _patch(shape, seed=0):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.int64)
    label[tuple(slice(1, s // 2 + 1) for s in shape)] = 1
    label[tuple(slice(s // 2, s - 1) for s in shape)] = 2
    image = np.stack([label.astype(np.float32) * 3.0, rng.normal(size=shape).astype(np.float32)])
    return image, label


@pytest.mark.parametrize("shape", [(12, 10), (6, 12, 10)])
def test_same_seed_same_patch_other_seed_other_patch(shape):
    aug = Augment(affine=1.0, intensity=1.0)
    image, label = _patch(shape)
    a = aug(image, label, np.random.default_rng([0, 1, 5, 1]))
    b = aug(image, label, np.random.default_rng([0, 1, 5, 1]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = aug(image, label, np.random.default_rng([0, 2, 5, 1]))
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == image.shape and a[0].dtype == np.float32
    assert a[1].shape == label.shape and a[1].dtype == np.int64
    assert set(np.unique(a[1])) <= {0, 1, 2}  # labels stay class indices (nearest, never blended)


def test_flips_move_image_and_label_together():
    image, label = _patch((6, 8, 10))
    out_img, out_lab = Augment(flip=1.0, affine=0.0, intensity=0.0, flip_axes=(0, 2))(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_lab, label[::-1, :, ::-1])
    np.testing.assert_array_equal(out_img, image[:, ::-1, :, ::-1])
    # channel 0 of the image is 3 x label: they stay aligned through every geometric step
    image, label = _patch((8, 32, 32))
    img2, lab2 = Augment(flip=0.5, affine=1.0, intensity=0.0)(image, label, np.random.default_rng(7))
    assert not np.array_equal(lab2, label)
    agree = np.rint(img2[0] / 3.0) == lab2
    assert agree.mean() > 0.95  # only voxels on a class boundary may differ (bilinear vs nearest)


def test_a_quarter_turn_rotates_in_the_plane_of_the_last_two_axes():
    from lorkd.data.augment import _affine

    image, label = _patch((3, 8, 8))
    img, lab = _affine(image, label, math.pi / 2, 1.0)
    assert any(np.array_equal(lab, np.rot90(label, k, axes=(1, 2))) for k in (1, -1))
    assert any(np.allclose(img, np.rot90(image, k, axes=(2, 3)), atol=1e-5) for k in (1, -1))
    # a zoom > 1 samples closer to the centre: the border ring of the label is no longer all kept
    _, zoomed = _affine(image, label, 0.0, 1.5)
    assert zoomed.shape == label.shape and not np.array_equal(zoomed, label)


def test_intensity_scale_shift_and_noise():
    image, label = _patch((6, 7))
    out, lab = Augment(**{**OFF, "intensity": 1.0}, intensity_scale=0.5, intensity_shift=2.0, noise=0.0)(
        image, label, np.random.default_rng(3))
    np.testing.assert_array_equal(lab, label)
    for c in range(2):  # per channel an affine map x -> x * (1 + a) + b with |a| <= .5, |b| <= 2
        a, b = np.polyfit(image[c].ravel(), out[c].ravel(), 1)
        assert 0.5 <= a <= 1.5 and abs(b) <= 2.0
    noisy, _ = Augment(**{**OFF, "intensity": 1.0}, intensity_scale=0.0, intensity_shift=0.0, noise=0.2)(
        image, label, np.random.default_rng(3))
    assert 0.1 < float(np.std(noisy - image)) < 0.3


def test_off_is_identity_and_bad_settings_are_named():
    image, label = _patch((5, 6, 7))
    out, lab = Augment(**OFF)(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(lab, label)
    with pytest.raises(ConfigError, match="augment.flip"):
        Augment(flip=1.5)
    with pytest.raises(ConfigError, match="augment.scale"):
        Augment(scale=1.0)
    with pytest.raises(ConfigError, match="augment.noise"):
        Augment(noise=-math.inf)
    with pytest.raises(ConfigError, match="flip_axes"):
        Augment(flip_axes=(3,))(image, label, np.random.default_rng(0))
