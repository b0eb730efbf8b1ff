"""The loss of one feature-distillation pair: a student feature against a teacher feature.

``mse`` / ``cosine``: the student feature goes through its learned projector (student width ->
teacher width), then :func:`~lorkd.distill.losses.feature_kd` (which resizes the student map to the
teacher's spatial size). ``cka``: ``1 - linear CKA`` (:func:`~lorkd.distill.cka.cka_loss`), no
projector: the two widths may differ. For a feature map every (sample, position) is one point of
the CKA (the student map is first resized to the teacher's size), so a mini-batch of ``n`` maps of
``P`` positions gives ``n * P`` points of ``C`` channels; pooled features ``[n, C]`` give ``n``
points. Fewer than 2 points (one pooled sample) have no CKA: the loss is then 0.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .cka import cka_loss
from .losses import feature_kd

__all__ = ["PAIR_KINDS", "feature_pair_loss", "points"]

PAIR_KINDS = ("mse", "cosine", "cka")
_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def points(x: Tensor) -> Tensor:
    """``[n, C]`` -> itself; ``[n, C, *spatial]`` -> ``[n * prod(spatial), C]`` (one row per position)."""
    return x if x.ndim == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


def feature_pair_loss(student: Tensor, teacher: Tensor, kind: str, projector: nn.Module | None = None) -> Tensor:
    """Loss of one pair on the same ``n`` samples (a 0-dim tensor).

    Args:
        student: ``[n, C_s]`` or ``[n, C_s, *spatial_s]`` (1 to 3 spatial dims), with its graph.
        teacher: ``[n, C_t]`` or ``[n, C_t, *spatial_t]``, same number of dims; detached inside.
        kind: ``"mse"``, ``"cosine"`` or ``"cka"``.
        projector: ``C_s -> C_t`` (e.g. :class:`~lorkd.distill.FeatureProjector`); required for
            ``mse``/``cosine``, ignored for ``cka``.

    Raises:
        ValueError: an unknown ``kind``, no projector for ``mse``/``cosine``, or shapes that do not
            fit (different ``n`` or number of dims; message names both shapes).
    """
    if kind not in PAIR_KINDS:
        raise ValueError(f"feature_pair_loss: kind must be one of {PAIR_KINDS}, got {kind!r}")
    if student.ndim != teacher.ndim or student.shape[0] != teacher.shape[0] or not 2 <= student.ndim <= 5:
        raise ValueError(f"feature_pair_loss: student shape {tuple(student.shape)} does not fit teacher shape "
                         f"{tuple(teacher.shape)} (need the same number of dims, 2 to 5, and of samples)")
    if kind != "cka":
        if projector is None:
            raise ValueError(f"feature_pair_loss: kind {kind!r} needs a projector")
        return feature_kd(projector(student), teacher, kind)
    spatial = student.ndim - 2
    if spatial and student.shape[2:] != teacher.shape[2:]:
        student = F.interpolate(student, size=tuple(teacher.shape[2:]), mode=_INTERP[spatial], align_corners=False)
    s, t = points(student), points(teacher)
    if s.shape[0] < 2:
        return student.sum() * 0.0
    return cka_loss(s, t)
