"""CKA and unbiased HSIC against hand-computed values and their invariances."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorkd.distill import cka_loss, linear_cka, unbiased_cka, unbiased_hsic


def _hsic_by_definition(k, l):
    """Song et al. (2012) eq. (5), written with explicit ones vectors and traces."""
    n = k.shape[0]
    kt = k.clone(); kt.fill_diagonal_(0)
    lt = l.clone(); lt.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=k.dtype)
    value = (torch.trace(kt @ lt).item()
             + (one.T @ kt @ one).item() * (one.T @ lt @ one).item() / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (one.T @ kt @ lt @ one).item())
    return value / (n * (n - 3))


def test_unbiased_hsic_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    assert unbiased_hsic(k, l).item() == pytest.approx(_hsic_by_definition(k, l), rel=1e-12)


def test_linear_cka_hand_computed():
    # x = [[1,0],[0,1],[-1,0],[0,-1]] is centred; y = x[:, :1] keeps one direction.
    x = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float64)
    y = x[:, :1]
    # X^T X = 2 I, Y^T Y = [2], Y^T X = [2, 0]: CKA = 4 / (sqrt(8) * 2) = 1/sqrt(2)
    assert linear_cka(x, y).item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)


@settings(deadline=None, max_examples=25)
@given(n=st.integers(5, 12), c=st.integers(1, 6), spatial=st.sampled_from([(), (3, 4), (2, 3, 2)]),
       seed=st.integers(0, 10_000))
def test_cka_of_a_map_with_itself_is_one_and_orthogonally_invariant(n, c, spatial, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    rotated = torch.einsum("dc,nc...->nd...", q, x)       # orthogonal transform of the channels
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(x, rotated).item() == pytest.approx(1.0, abs=1e-10)
    assert unbiased_cka(x, x).item() == pytest.approx(1.0, abs=1e-10)
    assert unbiased_cka(x, rotated).item() == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(n, c + 2, *spatial, generator=g, dtype=torch.float64)
    assert linear_cka(x, y).item() == pytest.approx(linear_cka(x, 3.0 * y).item(), rel=1e-10)


def test_cka_loss_gives_gradient_only_to_the_student():
    s = torch.randn(6, 4, 3, 3, requires_grad=True)
    t = torch.randn(6, 8, 3, 3, requires_grad=True)
    cka_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="samples"):
        linear_cka(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_cka(torch.randn(3, 2), torch.randn(3, 2))


def test_wide_features_use_the_gram_form_with_the_same_value():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, dtype=torch.float64, generator=g)   # n < D: Gram branch
    y = torch.randn(6, 30, dtype=torch.float64, generator=g)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).pow(2).sum() / ((xc.T @ xc).pow(2).sum().sqrt() * (yc.T @ yc).pow(2).sum().sqrt())
    assert linear_cka(x, y).item() == pytest.approx(expected.item(), rel=1e-10)
