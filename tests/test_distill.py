import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lorkd.distill import FeatureProjector, dice_ce_loss, feature_kd, soft_target_kd
from lorkd.errors import ConfigError, DataError


# ---------------------------------------------------------------- soft_target_kd


def _softmax2(a, b):
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def test_kd_two_class_by_hand():
    T = 2.0
    s = [[1.0, 3.0], [0.0, 0.0]]
    t = [[2.0, 0.0], [4.0, 2.0]]
    expected = 0.0
    for srow, trow in zip(s, t):
        ps = _softmax2(srow[0] / T, srow[1] / T)
        pt = _softmax2(trow[0] / T, trow[1] / T)
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected = expected / 2 * T**2  # batchmean over 2 rows, times T^2
    got = soft_target_kd(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), T)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_kd_zero_when_equal_and_positive_otherwise():
    x = torch.randn(5, 7)
    assert soft_target_kd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_kd(x, torch.randn(5, 7)).item() > 0


def test_kd_gradient_reaches_student_not_teacher():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    soft_target_kd(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_temperature_squared_scaling():
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for T in (0.5, 1.0, 3.0):
        raw = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
        assert soft_target_kd(s, t, T).item() == pytest.approx(T**2 * raw.item(), rel=1e-10)
    # pre-scaling logits by T at temperature T equals temperature 1 times T^2
    assert soft_target_kd(s * 3, t * 3, 3.0).item() == pytest.approx(9 * soft_target_kd(s, t, 1.0).item(), rel=1e-10)


@settings(max_examples=20, deadline=None)
@given(spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3), b=st.integers(1, 3), c=st.integers(2, 4))
def test_kd_dense_equals_flattened(spatial, b, c):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, c, *spatial, generator=g, dtype=torch.float64)
    t = torch.randn(b, c, *spatial, generator=g, dtype=torch.float64)
    flat_s = s.movedim(1, -1).reshape(-1, c)
    flat_t = t.movedim(1, -1).reshape(-1, c)
    assert soft_target_kd(s, t, 2.0).item() == pytest.approx(soft_target_kd(flat_s, flat_t, 2.0).item(), rel=1e-10)
    # mean over voxels, not sum: a constant map equals its single-voxel value
    one_s, one_t = torch.randn(b, c, dtype=torch.float64), torch.randn(b, c, dtype=torch.float64)
    view = (b, c) + (1,) * len(spatial)
    const_s = one_s.view(view).expand(b, c, *spatial)
    const_t = one_t.view(view).expand(b, c, *spatial)
    assert soft_target_kd(const_s, const_t).item() == pytest.approx(soft_target_kd(one_s, one_t).item(), rel=1e-10)


def test_kd_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        soft_target_kd(torch.zeros(2, 3), torch.zeros(2, 4))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="temperature"):
            soft_target_kd(torch.zeros(2, 3), torch.zeros(2, 3), bad)


# ---------------------------------------------------------------- feature_kd


def test_feature_kd_mse_and_cosine_values():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert feature_kd(s, t, "mse").item() == pytest.approx((1 + 1 + 0 + 1) / 4)
    assert feature_kd(s, t, "cosine").item() == pytest.approx((1.0 + 0.0) / 2)


def test_feature_kd_cosine_over_positions():
    s = torch.zeros(1, 2, 1, 2)
    s[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # cos 1 with teacher
    s[0, :, 0, 1] = torch.tensor([-3.0, 0.0])  # cos -1 with teacher
    t = torch.zeros(1, 2, 1, 2)
    t[0, 0] = 1.0
    assert feature_kd(s, t, "cosine").item() == pytest.approx((0.0 + 2.0) / 2)


@pytest.mark.parametrize("spatial_s,spatial_t", [((8,), (4,)), ((4, 4), (8, 8)), ((2, 4, 4), (4, 8, 8))])
def test_feature_kd_resizes_student(spatial_s, spatial_t):
    s = torch.randn(2, 3, *spatial_s, requires_grad=True)
    t = torch.randn(2, 3, *spatial_t, requires_grad=True)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial_s)]
    expected = F.mse_loss(F.interpolate(s, size=spatial_t, mode=mode, align_corners=False), t)
    loss = feature_kd(s, t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_feature_kd_errors():
    with pytest.raises(ValueError, match="student_features shape"):
        feature_kd(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError):
        feature_kd(torch.zeros(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(ConfigError, match="kind"):
        feature_kd(torch.zeros(2, 3), torch.zeros(2, 3), kind="l1")


# ---------------------------------------------------------------- dice_ce_loss


def test_dice_ce_by_hand():
    # B=1, C=2, 2 voxels; logits chosen so softmax gives known probabilities
    p1 = [0.8, 0.3]  # foreground probability per voxel
    logits = torch.tensor([[[0.0, 0.0], [math.log(p1[0] / (1 - p1[0])), math.log(p1[1] / (1 - p1[1]))]]], dtype=torch.float64)
    labels = torch.tensor([[1, 0]])
    smooth = 1e-5
    dice_fg = 1 - (2 * 0.8 + smooth) / ((0.8 + 0.3) + 1 + smooth)
    ce = -(math.log(0.8) + math.log(0.7)) / 2
    assert dice_ce_loss(logits, labels).item() == pytest.approx(dice_fg + ce, rel=1e-9)
    dice_bg = 1 - (2 * 0.7 + smooth) / ((0.2 + 0.7) + 1 + smooth)
    got = dice_ce_loss(logits, labels, include_background=True).item()
    assert got == pytest.approx((dice_fg + dice_bg) / 2 + ce, rel=1e-9)


@pytest.mark.parametrize("include_background", [False, True])
def test_dice_ce_matches_monai(include_background):
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, 6, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 5, 6, 3), generator=g)
    ref = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True)(logits, labels[:, None])
    assert dice_ce_loss(logits, labels, include_background).item() == pytest.approx(ref.item(), rel=1e-9)


@pytest.mark.parametrize("shape", [(3, 4, 16), (2, 3, 8, 8), (1, 2, 5, 6, 7), (2, 5, 4, 4, 4)], ids=["1d", "2d", "3d", "3d-5"])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("labels_kind", ["random", "empty-class", "background-only", "channel-dim"])
def test_dice_ce_agrees_with_monai_to_float_rounding(shape, include_background, labels_kind):
    # MONAI's denominator 2 * (tp + fp + fn) rounds differently (see dice_ce_loss's docstring)
    from monai.losses import DiceCELoss

    g = torch.Generator().manual_seed(sum(shape) * 10 + len(labels_kind))
    logits = (torch.randn(shape, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    if labels_kind == "empty-class":
        labels[labels == shape[1] - 1] = 0
    elif labels_kind == "background-only":
        labels.zero_()
    got = dice_ce_loss(logits, labels[:, None] if labels_kind == "channel-dim" else labels, include_background,
                       smooth=1e-4, lambda_dice=0.7, lambda_ce=1.3)
    ref = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, smooth_nr=1e-4,
                     smooth_dr=1e-4, lambda_dice=0.7, lambda_ce=1.3)(logits, labels[:, None])
    (grad_got,) = torch.autograd.grad(got, logits)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_got, grad_ref, rtol=1e-5, atol=1e-7)

def test_dice_ce_errors():
    with pytest.raises(ValueError, match="labels shape"):
        dice_ce_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        dice_ce_loss(torch.zeros(1, 2, 4), torch.full((1, 4), 2))
    with pytest.raises(DataError, match="integer"):
        dice_ce_loss(torch.zeros(1, 2, 4), torch.zeros(1, 4))


# ---------------------------------------------------------------- FeatureProjector


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
def test_projector_shapes(spatial_dims):
    proj = FeatureProjector(6, 10, spatial_dims)
    spatial = (3, 4, 5)[:spatial_dims]
    y = proj(torch.randn(2, 6, *spatial))
    assert y.shape == (2, 10, *spatial)
    expected_type = {0: torch.nn.Linear, 1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[spatial_dims]
    assert type(proj.proj) is expected_type
    if spatial_dims:
        assert proj.proj.kernel_size == (1,) * spatial_dims


def test_projector_conv_is_per_position_linear():
    proj = FeatureProjector(3, 2, spatial_dims=2)
    x = torch.randn(1, 3, 4, 4)
    w = proj.proj.weight.view(2, 3)
    expected = torch.einsum("oc,bchw->bohw", w, x) + proj.proj.bias.view(1, 2, 1, 1)
    torch.testing.assert_close(proj(x), expected)


def test_projector_errors():
    with pytest.raises(ConfigError, match="spatial_dims"):
        FeatureProjector(3, 4, spatial_dims=4)
    with pytest.raises(ConfigError, match="in_channels"):
        FeatureProjector(0, 4)
    with pytest.raises(ValueError, match=r"\(2, 5, 4, 4\)"):
        FeatureProjector(3, 4, spatial_dims=2)(torch.zeros(2, 5, 4, 4))
