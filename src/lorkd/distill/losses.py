"""Distillation and segmentation losses.

All three functions return a scalar tensor that can be back-propagated into the student. Teacher
tensors are detached inside, so the teacher never receives gradients even if the caller forgot
``torch.no_grad()``.

Shape conventions: classification logits are ``[B, C]``; dense (segmentation) logits and feature
maps are ``[B, C, *spatial]`` with ``*spatial`` one of ``[L]``, ``[H, W]`` or ``[D, H, W]``; the
class / channel dimension is always dim 1.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor

from lorkd.errors import ConfigError, DataError

__all__ = ["soft_target_kd", "feature_kd", "dice_ce_loss"]

_INTERP_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _classes_last(x: Tensor) -> Tensor:
    """``[B, C]`` or ``[B, C, *spatial]`` -> ``[N, C]`` with N = B * prod(spatial)."""
    if x.ndim == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def soft_target_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target knowledge distillation (Hinton et al.): ``T**2 * KL(p_t || p_s)``.

    ``p_t = softmax(teacher / T)`` and ``p_s = softmax(student / T)`` along the class dimension.
    The KL divergence uses ``reduction="batchmean"``: summed over classes, averaged over rows.

    Args:
        student_logits: ``[B, C]`` (classification) or ``[B, C, *spatial]`` (dense, e.g.
            segmentation). For dense logits every voxel is one row: the class dim is moved last and
            the tensor flattened to ``[B * prod(spatial), C]``, so the result is the mean over batch
            *and* voxels of the per-voxel KL.
        teacher_logits: same shape as ``student_logits``; detached inside.
        temperature: ``T > 0``. The result is multiplied by ``T**2`` so that gradient magnitudes
            stay comparable across temperatures.

    Returns:
        A scalar tensor (0-dim), ``>= 0``; zero when the two logits are equal.

    Raises:
        ValueError: the two shapes differ (message names both), or the logits have fewer than
            2 dims.
        ConfigError (a ValueError): ``temperature <= 0`` or not finite.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"soft_target_kd: student_logits shape {tuple(student_logits.shape)} != "
            f"teacher_logits shape {tuple(teacher_logits.shape)}"
        )
    if student_logits.ndim < 2:
        raise ValueError(
            f"soft_target_kd: logits must be [B, C] or [B, C, *spatial], got shape "
            f"{tuple(student_logits.shape)}"
        )
    temperature = float(temperature)
    if not (temperature > 0.0) or temperature == float("inf"):
        raise ConfigError(f"soft_target_kd: temperature must be a finite number > 0, got {temperature}")
    s = _classes_last(student_logits)
    t = _classes_last(teacher_logits.detach())
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (temperature**2)


def feature_kd(student_features: Tensor, teacher_features: Tensor, kind: str = "mse") -> Tensor:
    """Feature distillation between (projected) student features and teacher features.

    The student features must already be projected to the teacher's channel count (see
    :class:`lorkd.distill.projector.FeatureProjector`).

    Spatial mismatch: if the spatial sizes differ, the **student** map is resized to the teacher's
    size (``linear`` / ``bilinear`` / ``trilinear`` for 1/2/3 spatial dims, ``align_corners=False``).
    The teacher is the target and stays untouched; resizing the student keeps the loss defined on
    the teacher's grid and lets the gradient flow back through the interpolation into the student.

    Args:
        student_features: ``[B, C]`` (pooled) or ``[B, C, *spatial]`` with 1 to 3 spatial dims.
        teacher_features: ``[B, C]`` or ``[B, C, *spatial']``, same ``B``, ``C`` and number of
            dims as the student; detached inside.
        kind: ``"mse"``: mean squared error over all elements; ``"cosine"``: mean over batch and
            positions of ``1 - cos(student, teacher)`` taken along the channel dim (dim 1).

    Returns:
        A scalar tensor (0-dim).

    Raises:
        ValueError: batch size, channel count or number of dims differ (message names both
            shapes), or more than 3 spatial dims.
        ConfigError (a ValueError): ``kind`` is not ``"mse"`` or ``"cosine"``.
    """
    if kind not in ("mse", "cosine"):
        raise ConfigError(f"feature_kd: kind must be 'mse' or 'cosine', got {kind!r}")
    s, t = student_features, teacher_features.detach()
    if s.ndim != t.ndim or s.ndim < 2 or s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"feature_kd: student_features shape {tuple(s.shape)} does not match teacher_features "
            f"shape {tuple(t.shape)} (need the same ndim >= 2, batch size and channel count)"
        )
    n_spatial = s.ndim - 2
    if n_spatial > 3:
        raise ValueError(f"feature_kd: at most 3 spatial dims are supported, got shape {tuple(s.shape)}")
    if n_spatial > 0 and s.shape[2:] != t.shape[2:]:
        s = F.interpolate(s, size=tuple(t.shape[2:]), mode=_INTERP_MODES[n_spatial], align_corners=False)
    if kind == "mse":
        return F.mse_loss(s, t.to(s.dtype))
    return (1.0 - F.cosine_similarity(s, t.to(s.dtype), dim=1)).mean()


def dice_ce_loss(
    logits: Tensor,
    labels: Tensor,
    include_background: bool = False,
    smooth: float = 1e-5,
    lambda_dice: float = 1.0,
    lambda_ce: float = 1.0,
) -> Tensor:
    """Soft Dice + cross-entropy loss for segmentation.

    ``loss = lambda_dice * dice + lambda_ce * ce`` where

    * ``ce`` is the mean voxel-wise cross-entropy over all classes (background included);
    * ``dice`` is the soft Dice loss on ``p = softmax(logits, dim=1)`` against one-hot labels ``g``,
      computed per sample ``b`` and class ``c`` as
      ``1 - (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)`` (sums over voxels), then
      averaged over samples and classes. By default the background class 0 is left out of the
      Dice average (``include_background=False``), i.e. the mean is over foreground classes
      ``1..C-1``; the same convention as MONAI's ``DiceCELoss(include_background=False,
      to_onehot_y=True, softmax=True)``. A class absent from a sample's labels still contributes
      (its Dice term then pushes its probability mass towards zero).

    Computed by MONAI's ``DiceCELoss`` (after the checks below); MONAI forms the Dice denominator
    as ``2 * (tp + fp + fn)``, which equals ``sum(p) + sum(g)`` up to float rounding (about 1e-7
    relative; ``tests/test_distill.py`` compares it with the formula above).

    Args:
        logits: ``[B, C, *spatial]`` float, unnormalised scores, ``C >= 2``.
        labels: ``[B, *spatial]`` integer class indices in ``[0, C)`` (a ``[B, 1, *spatial]``
            tensor is also accepted).
        include_background: include class 0 in the Dice average.
        smooth: added to numerator and denominator of every Dice ratio.
        lambda_dice, lambda_ce: weights of the two terms.

    Returns:
        A scalar tensor (0-dim).

    Raises:
        ValueError: shapes do not fit (message names both), or ``C < 2``.
        DataError (a ValueError): labels are not integers or lie outside ``[0, C)``.
    """
    if logits.ndim < 3:
        raise ValueError(f"dice_ce_loss: logits must be [B, C, *spatial], got shape {tuple(logits.shape)}")
    if labels.ndim == logits.ndim and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"dice_ce_loss: labels shape {tuple(labels.shape)} does not fit logits shape "
            f"{tuple(logits.shape)} (expected labels [B, *spatial])"
        )
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"dice_ce_loss: need at least 2 classes (channel dim 1), got shape {tuple(logits.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise DataError(f"dice_ce_loss: labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"dice_ce_loss: labels must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return _dice_ce(include_background, smooth, lambda_dice, lambda_ce)(logits, labels[:, None])


@functools.lru_cache(maxsize=8)
def _dice_ce(include_background: bool, smooth: float, lambda_dice: float, lambda_ce: float) -> DiceCELoss:
    return DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, smooth_nr=smooth,
                      smooth_dr=smooth, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
