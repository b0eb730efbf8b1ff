"""Centered kernel alignment (CKA) between two sets of features of the same samples.

Both functions take features of the same ``n`` samples in any layout ``[n, C]`` or
``[n, C, *spatial]`` (2D and 3D feature maps); maps are flattened per sample to ``[n, D]``
(Kornblith et al., 2019, treat every sample as one point). The two inputs may have different
widths: CKA compares the samples' similarity structures, so no projector is needed.

* :func:`linear_cka`: the biased estimator ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on
  column-centred features. 1 for identical inputs, invariant to orthogonal transforms and
  isotropic scaling of either side.
* :func:`unbiased_hsic` / :func:`unbiased_cka`: the unbiased HSIC estimator of Song et al.
  (2012), used by Reprogramming Distillation, with linear kernels; needs ``n >= 4``.

Distillation uses ``1 - cka`` as a loss (differentiable in both inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cka", "unbiased_hsic", "unbiased_cka", "cka_loss"]

_EPS = 1e-12


def _flat(x: Tensor, name: str) -> Tensor:
    if x.ndim < 2:
        raise ValueError(f"{name}: expected [n, C] or [n, C, *spatial], got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    a, b = _flat(x, "x"), _flat(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"CKA: x has {a.shape[0]} samples and y has {b.shape[0]}; they must match")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of ``x`` ``[n, ...]`` and ``y`` ``[n, ...]``: a 0-dim tensor in ``[0, 1]``.

    Raises:
        ValueError: fewer than 2 dims, or different sample counts.
    """
    a, b = _pair(x, y)
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    if a.shape[0] < max(a.shape[1], b.shape[1]):
        # few samples, wide features: the same sums through the [n, n] Gram matrices
        # (||B^T A||_F^2 = <A A^T, B B^T>_F), never a [D, D] matrix.
        k, l = a @ a.T, b @ b.T
        cross, norm_a, norm_b = (k * l).sum(), k.pow(2).sum().sqrt(), l.pow(2).sum().sqrt()
    else:
        cross = (b.T @ a).pow(2).sum()
        norm_a = (a.T @ a).pow(2).sum().sqrt()
        norm_b = (b.T @ b).pow(2).sum().sqrt()
    return cross / (norm_a * norm_b + _EPS)


def unbiased_hsic(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC of two ``[n, n]`` kernel matrices (Song et al., 2012), ``n >= 4``.

    ``HSIC_1 = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))``
    where ``K~``, ``L~`` are the kernels with their diagonals set to zero.

    Raises:
        ValueError: not square, different sizes, or ``n < 4``.
    """
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"unbiased_hsic: expected two [n, n] kernels of one size, got {tuple(k.shape)} and {tuple(l.shape)}")
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"unbiased_hsic: needs at least 4 samples, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=k.device)
    kt = k.masked_fill(eye, 0)
    lt = l.masked_fill(eye, 0)
    ones_k = kt.sum()
    ones_l = lt.sum()
    term1 = (kt * lt).sum()                      # tr(K~ L~) for symmetric kernels
    term2 = ones_k * ones_l / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (kt.sum(0) * lt.sum(1)).sum()   # 1^T K~ L~ 1
    return (term1 + term2 - term3) / (n * (n - 3))


def unbiased_cka(x: Tensor, y: Tensor) -> Tensor:
    """CKA of ``x`` and ``y`` (``[n, ...]`` each, ``n >= 4``) with linear kernels and unbiased HSIC.

    ``HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))``; 0-dim tensor (can be slightly negative
    for unrelated features, as the estimator is unbiased).

    Raises:
        ValueError: as :func:`linear_cka`, or ``n < 4``.
    """
    a, b = _pair(x, y)
    k, l = a @ a.T, b @ b.T
    hkl = unbiased_hsic(k, l)
    hkk = unbiased_hsic(k, k).clamp_min(0)
    hll = unbiased_hsic(l, l).clamp_min(0)
    return hkl / ((hkk * hll).sqrt() + _EPS)


def cka_loss(student: Tensor, teacher: Tensor, unbiased: bool = False) -> Tensor:
    """``1 - CKA(student, teacher)``; the teacher side is detached."""
    cka = unbiased_cka if unbiased else linear_cka
    return 1.0 - cka(student, teacher.detach())
