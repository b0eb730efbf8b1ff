"""The loss of one feature pair: mse / cosine through a projector, cka without, 2D and 3D maps, pooled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorkd.distill import FeatureProjector, feature_pair_loss, linear_cka
from lorkd.distill.pair import points


def identity_projector(channels: int, spatial_dims: int) -> FeatureProjector:
    proj = FeatureProjector(channels, channels, spatial_dims=spatial_dims)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.eye(channels).reshape(proj.proj.weight.shape))
        proj.proj.bias.zero_()
    return proj


@pytest.mark.parametrize("spatial", [(), (5, 6), (3, 4, 5)], ids=["pooled", "2d", "3d"])
def test_mse_and_cosine_values_through_an_identity_projector(spatial):
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, *spatial), torch.randn(4, 3, *spatial)
    proj = identity_projector(3, len(spatial))
    assert feature_pair_loss(s, t, "mse", proj).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-5)
    cos = (1 - F.cosine_similarity(s, t, dim=1)).mean()
    assert feature_pair_loss(s, t, "cosine", proj).item() == pytest.approx(cos.item(), rel=1e-5)


@pytest.mark.parametrize("spatial_s,spatial_t", [((4, 4), (8, 8)), ((2, 4, 4), (4, 8, 8))], ids=["2d", "3d"])
def test_cka_compares_positions_after_resizing_the_student(spatial_s, spatial_t):
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, *spatial_s), torch.randn(3, 7, *spatial_t)  # widths differ: no projector
    mode = "bilinear" if len(spatial_t) == 2 else "trilinear"
    resized = F.interpolate(s, size=spatial_t, mode=mode, align_corners=False)
    expected = 1 - linear_cka(points(resized), points(t))
    assert points(t).shape == (3 * t[0, 0].numel(), 7)
    assert feature_pair_loss(s, t, "cka").item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("spatial", [(), (4, 4), (2, 3, 3)], ids=["pooled", "2d", "3d"])
def test_cka_is_zero_for_an_orthogonal_map_of_the_channels(spatial):
    torch.manual_seed(1)
    t = torch.randn(6, 4, *spatial)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    s = torch.einsum("dc,nc...->nd...", q, t) * 3.0  # rotated and scaled channels
    assert feature_pair_loss(s, t, "cka").item() == pytest.approx(0.0, abs=1e-5)
    assert feature_pair_loss(t, torch.randn_like(t), "cka").item() > 0.05


@pytest.mark.parametrize("kind", ["mse", "cosine", "cka"])
@pytest.mark.parametrize("spatial", [(4, 4), (2, 4, 4)], ids=["2d", "3d"])
def test_gradients_reach_student_and_projector_only(kind, spatial):
    torch.manual_seed(0)
    s = torch.randn(3, 4, *spatial, requires_grad=True)
    t = torch.randn(3, 6, *spatial, requires_grad=True)  # the loss must not reach the teacher side
    proj = FeatureProjector(4, 6, spatial_dims=len(spatial)) if kind != "cka" else None
    feature_pair_loss(s, t, kind, proj).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    if proj is not None:
        assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0


def test_cka_of_one_pooled_sample_is_zero_with_zero_gradient():
    s = torch.randn(1, 4, requires_grad=True)
    loss = feature_pair_loss(s, torch.randn(1, 6), "cka")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs a projector"):
        feature_pair_loss(torch.zeros(2, 3), torch.zeros(2, 3), "mse")
    with pytest.raises(ValueError, match="kind must be one of"):
        feature_pair_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l1")
    with pytest.raises(ValueError, match=r"student shape \(2, 3\) does not fit teacher shape \(2, 3, 4, 4\)"):
        feature_pair_loss(torch.zeros(2, 3), torch.zeros(2, 3, 4, 4), "cka")
