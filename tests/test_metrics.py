import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.networks.nets import UNet
from torch import nn

from lorkd.engine.metrics import (
    accuracy,
    count_flops,
    count_parameters,
    cpu_latency_ms,
    dice_per_class,
    hd95_per_class,
    image_diagonal,
    roc_auc,
    structure_errors,
)
from lorkd.errors import ConfigError, DataError
from lorkd.models.backbones import backbone_spec, build_backbone

# ---------------------------------------------------------------- accuracy


def test_accuracy_scores_and_preds():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    assert accuracy(scores, labels) == pytest.approx(0.75)
    assert accuracy(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(0.75)
    assert accuracy(np.array([2, 0, 1]), np.array([2, 1, 1])) == pytest.approx(2 / 3)


def test_accuracy_errors():
    with pytest.raises(DataError, match="differ"):
        accuracy(np.zeros((3, 2)), np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="0 samples"):
        accuracy(np.zeros((0, 2)), np.zeros(0, dtype=int))
    with pytest.raises(DataError, match="integer"):
        accuracy(np.array([0.3, 0.7]), np.array([0, 1]))


# ---------------------------------------------------------------- roc_auc


def _brute_auc(s, positive):
    pos, neg = s[positive], s[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_auc_by_hand():
    # positives 0.8, 0.4; negatives 0.4, 0.1 -> pairs: 1, 1, 0.5, 1 -> 3.5 / 4
    s = np.array([0.8, 0.4, 0.4, 0.1])
    y = np.array([1, 1, 0, 0])
    assert roc_auc(s, y) == pytest.approx(0.875)
    assert roc_auc(np.stack([1 - s, s], 1), y) == pytest.approx(0.875)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(2, 30),
    c=st.integers(2, 4),
)
def test_auc_matches_pairwise_count(data, n, c):
    # scores drawn from a few levels so ties are frequent
    scores = np.array(data.draw(st.lists(st.lists(st.integers(0, 4), min_size=c, max_size=c), min_size=n, max_size=n)), dtype=float) / 4
    labels = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    got = roc_auc(scores, labels)
    if c == 2:
        expected = _brute_auc(scores[:, 1], labels == 1)
    else:
        expected = float(np.mean([_brute_auc(scores[:, k], labels == k) for k in range(c)]))
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_auc_nan_when_class_has_no_positives():
    s = np.random.default_rng(0).random((6, 3))
    assert math.isnan(roc_auc(s, np.array([0, 1, 0, 1, 0, 1])))  # class 2 never occurs
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_auc_errors():
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        roc_auc(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(DataError, match="nan"):
        roc_auc(np.array([np.nan, 0.1]), np.array([0, 1]))


# ---------------------------------------------------------------- dice


def test_dice_per_class_by_hand():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    target = np.array([[0, 1, 0], [2, 0, 0]])
    d = dice_per_class(pred, target, num_classes=4)
    # class 1: |P|=2,|T|=1,|P&T|=1 -> 2/3; class 2: |P|=2,|T|=1,inter 1 -> 2/3; class 3 absent from both -> 1
    assert d.shape == (3,)
    np.testing.assert_allclose(d, [2 / 3, 2 / 3, 1.0])
    assert dice_per_class(np.array([1, 0]), np.array([0, 1]), 2)[0] == 0.0
    assert dice_per_class(torch.tensor([[1, 1]]), torch.tensor([[1, 1]]), 2)[0] == 1.0


def test_dice_absent_class_is_left_out_as_monai_ignore_empty():
    """absent=nan: a class absent from both prediction and label is NaN, as MONAI's
    DiceMetric(ignore_empty=True) gives it; every other entry equals MONAI's (ignore_empty=True)."""
    from monai.metrics import DiceMetric

    pred = np.array([[0, 1, 1], [0, 0, 0]])
    target = np.array([[0, 1, 0], [0, 0, 0]])  # class 2 absent from both
    d = dice_per_class(pred, target, 3, absent=math.nan)
    assert d[0] == pytest.approx(2 / 3) and math.isnan(d[1])
    one_hot = lambda a: torch.nn.functional.one_hot(torch.as_tensor(a), 3).movedim(-1, 0)[None].float()
    ref = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(one_hot(pred), one_hot(target))
    np.testing.assert_allclose(d, ref[0].numpy(), equal_nan=True)
    # the headline mean (NaN left out) is that of the present class, not lifted by a perfect 1
    assert np.nanmean(d) == pytest.approx(2 / 3)
    assert dice_per_class(pred, target, 3)[1] == 1.0  # the default keeps MONAI's ignore_empty=False value


def test_dice_errors():
    with pytest.raises(DataError, match="shape"):
        dice_per_class(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        dice_per_class(np.array([0, 2]), np.array([0, 1]), 2)


# ---------------------------------------------------------------- hd95


def _square(shape, r0, c0, size, label=1):
    a = np.zeros(shape, dtype=np.int64)
    a[r0 : r0 + size, c0 : c0 + size] = label
    return a


def test_hd95_single_voxels():
    pred = np.zeros((8, 8), int)
    target = np.zeros((8, 8), int)
    pred[1, 1] = 1
    target[4, 5] = 1
    assert hd95_per_class(pred, target, 2)[0] == pytest.approx(5.0)
    assert hd95_per_class(pred, target, 2, spacing=(2.0, 1.0))[0] == pytest.approx(math.hypot(6, 4))


def test_hd95_shifted_squares():
    # 5x5 squares shifted by 3 columns. Surface-to-surface distances from either square (by
    # symmetry): top/bottom rows [3,2,1,0,0] each, side columns 3 (x3) and 1 (x3) -> 95th pct = 3.
    pred = _square((20, 20), 5, 5, 5)
    target = _square((20, 20), 5, 8, 5)
    assert hd95_per_class(pred, target, 2)[0] == pytest.approx(3.0)
    assert hd95_per_class(pred, target, 2, spacing=(1.0, 0.5))[0] == pytest.approx(1.5)
    assert hd95_per_class(pred, pred, 2)[0] == 0.0


def test_hd95_cube_3d_and_missing_classes():
    pred = np.zeros((10, 10, 10), int)
    target = np.zeros((10, 10, 10), int)
    pred[2:6, 2:6, 2:6] = 1
    target[2:6, 2:6, 4:8] = 1  # shift 2 along the last axis
    target[0, 0, 0] = 3  # class 3 only in target
    h = hd95_per_class(pred, target, 4)
    assert h.shape == (3,)
    assert h[0] == pytest.approx(2.0)
    # class 2 absent from both: excluded (nan); class 3 missed: the image diagonal as penalty
    assert math.isnan(h[1]) and h[2] == pytest.approx(math.sqrt(300))
    assert hd95_per_class(pred, target, 4, penalty=99.0)[2] == 99.0


def test_hd95_in_mm_with_anisotropic_spacing_by_hand():
    spacing = (5.0, 0.8, 0.8)  # 5 mm slices, 0.8 mm in plane
    pred = np.zeros((6, 9, 9), int)
    target = np.zeros((6, 9, 9), int)
    pred[1, 1, 1] = 1
    target[3, 2, 5] = 1  # single voxels: the distance is that of the two centres in mm
    assert hd95_per_class(pred, target, 2, spacing)[0] == pytest.approx(math.sqrt(10.0**2 + 0.8**2 + 3.2**2), rel=1e-6)
    # 3x5x5 blocks, the prediction one slice deeper. Directed distances from the prediction's 66
    # surface voxels: slice z=3 (overlap): 16 ring voxels 0, 8 inner 0.8 (to the ring in plane), the centre
    # 1.6; z=4 ring: 0 (the target's z=4 slice is all surface); z=5: 25 voxels at 5 mm. Sorted:
    # 32 x 0, 8 x 0.8, 1 x 1.6, 25 x 5 -> 95th percentile (index 61.75) = 5 mm; the reverse is symmetric.
    big_p = np.zeros((10, 12, 12), int)
    big_t = np.zeros((10, 12, 12), int)
    big_t[2:5, 3:8, 3:8] = 1
    big_p[3:6, 3:8, 3:8] = 1
    assert hd95_per_class(big_p, big_t, 2, spacing)[0] == pytest.approx(5.0)
    assert hd95_per_class(big_p, big_t, 2)[0] == pytest.approx(1.0)  # in voxels: one slice
    # with 1 mm slices the slab distances shrink to 1 mm (the spacing is applied per axis)
    assert hd95_per_class(big_p, big_t, 2, (1.0, 0.8, 0.8))[0] == pytest.approx(1.0)


def test_missed_and_spurious_structures():
    target = np.zeros((4, 5), int)
    pred = np.zeros((4, 5), int)
    target[0, 0] = 1  # class 1 missed
    pred[3, 4] = 2  # class 2 spurious
    target[1, 1] = pred[1, 1] = 3  # class 3 found
    missed, spurious = structure_errors(pred, target, 5)  # class 4 absent from both
    assert missed.tolist() == [True, False, False, False]
    assert spurious.tolist() == [False, True, False, False]
    h = hd95_per_class(pred, target, 5, spacing=(2.0, 3.0))
    diag = image_diagonal((4, 5), (2.0, 3.0))
    assert diag == pytest.approx(math.hypot(8.0, 15.0))
    assert h[0] == pytest.approx(diag) and h[1] == pytest.approx(diag) and h[2] == 0.0 and math.isnan(h[3])
    np.testing.assert_allclose(dice_per_class(pred, target, 5), [0.0, 0.0, 1.0, 1.0])


def test_hd95_spacing_error():
    with pytest.raises(ConfigError, match="spacing"):
        hd95_per_class(np.ones((3, 3), int), np.ones((3, 3), int), 2, spacing=(1.0,))


# ---------------------------------------------------------------- cost


def test_count_parameters():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert count_parameters(m) == 3 * 4 + 4 + 4 * 2 + 2
    m[0].weight.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 4 + 4 * 2 + 2


def test_count_flops_conv_and_linear():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)  # 10x10 -> 5x5
    assert count_flops(conv, torch.zeros(2, 3, 10, 10)) == 2 * 8 * 5 * 5 * 3 * 3 * 3
    grouped = nn.Conv2d(4, 8, kernel_size=(1, 3), groups=2)  # 6x6 -> 6x4
    assert count_flops(grouped, torch.zeros(1, 4, 6, 6)) == 8 * 6 * 4 * 2 * 3
    lin = nn.Linear(5, 7)
    assert count_flops(lin, torch.zeros(3, 5)) == 3 * 5 * 7
    assert count_flops(lin, torch.zeros(2, 4, 5)) == 8 * 5 * 7
    convt = nn.ConvTranspose2d(4, 2, kernel_size=2, stride=2)
    assert count_flops(convt, torch.zeros(1, 4, 3, 3)) == 4 * 3 * 3 * 2 * 2 * 2
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    net.train()
    assert count_flops(net, torch.zeros(2, 3, 10, 10)) == 2 * 8 * 25 * 27 + 2 * 200 * 10
    assert net.training


@pytest.mark.parametrize("name,expected", [
    ("demo resnet18 2D", 16_441_856), ("unet 3D", 63_078_400), ("transformer", 28_672), ("shared linear", 900),
])
def test_count_flops_keeps_the_numbers_of_the_hook_counter(name, expected):
    # expected: what the forward-hook counter reported before count_flops used FlopCounterMode
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    net, x = {
        "demo resnet18 2D": lambda: (build_backbone(backbone_spec("resnet18", 2, 1, widen=0.25))[0],
                                     torch.randn(2, 1, 28, 28)),
        "unet 3D": lambda: (UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=2), torch.randn(1, 1, 32, 32, 32)),
        "transformer": lambda: (nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                                      enable_nested_tensor=False), torch.randn(2, 7, 16)),
        "shared linear": lambda: (nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(6, 3)), torch.randn(2, 5, 6)),
    }[name]()
    assert count_flops(net, x) == expected

def test_cpu_latency_ms():
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    m.train()
    ms = cpu_latency_ms(m, torch.randn(4, 8), repeats=3, warmup=1)
    assert ms > 0 and math.isfinite(ms)
    assert m.training
    assert int(m[1].num_batches_tracked) == 0  # ran in eval mode
    with pytest.raises(ConfigError, match="repeats"):
        cpu_latency_ms(m, torch.randn(4, 8), repeats=0)
