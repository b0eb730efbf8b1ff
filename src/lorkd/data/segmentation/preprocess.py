"""Per-case preprocessing: intensity normalisation, then resampling to a scale, spacing or shape."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lorkd.errors import ConfigError

from .cases import Case

__all__ = ["NORMALIZE_DETAILS", "NORMALIZE_TRANSFORMS", "Preprocess", "normalize_intensity", "resample",
           "resize_case", "preprocess_case"]


NORMALIZE_MODES = ("zscore", "zscore_nonzero", "minmax", "none")

#: What each ``normalize`` mode computes, exactly (the expert card and the MONAI bundle say it).
NORMALIZE_DETAILS = {
    "zscore": "per channel c of the case's image [C, *spatial], separately: (x_c - mean(x_c)) / std(x_c) over all "
              "voxels of that channel of the whole image (population std, ddof=0; a constant channel is only "
              "shifted); not one mean/std over all channels",
    "zscore_nonzero": "per channel c separately: mean and std (ddof=0) over the nonzero voxels of channel c, applied to "
                      "them; zeros stay 0 (a constant channel is only shifted)",
    "minmax": "per channel c separately: (x_c - min(x_c)) / (max(x_c) - min(x_c)) into [0, 1] (a constant channel "
              "becomes 0)",
    "none": "no intensity normalisation (raw values)",
}

#: The MONAI array transform that computes the same as each mode (for a bundle's ``preprocessing``).
NORMALIZE_TRANSFORMS = {
    "zscore": {"_target_": "NormalizeIntensity", "nonzero": False, "channel_wise": True},
    "zscore_nonzero": {"_target_": "NormalizeIntensity", "nonzero": True, "channel_wise": True},
    "minmax": {"_target_": "ScaleIntensity", "minv": 0.0, "maxv": 1.0, "channel_wise": True},
    "none": {"_target_": "Identity"},
}


@dataclass(frozen=True)
class Preprocess:
    """Per-case preprocessing (hashable: it keys the volume cache).

    normalize, per channel:
        ``"zscore"``: ``(x - mean) / std`` over all voxels;
        ``"zscore_nonzero"``: mean/std over the nonzero voxels, applied to them, zeros stay 0;
        ``"minmax"``: ``(x - min) / (max - min)`` into ``[0, 1]``; ``"none"``.
        A constant channel is only shifted (no division by zero).
    Resampling (at most one of): ``scale`` (a factor, or one per spatial axis: ``0.5`` halves every
    axis, ``(1, 0.5, 0.5)`` keeps the first); ``target_spacing`` (voxel size per axis, using the
    case's spacing; ``None`` entries keep that axis); ``target_shape`` (``None`` entries keep that
    axis). Images are interpolated (bi/trilinear, ``align_corners=False``), labels with
    ``nearest-exact``. Normalisation happens before resampling.
    """

    normalize: str = "zscore"
    scale: float | tuple[float, ...] | None = None
    target_spacing: tuple[float | None, ...] | None = None
    target_shape: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"Preprocess.normalize={self.normalize!r}; use one of {NORMALIZE_MODES}")
        given = [k for k in ("scale", "target_spacing", "target_shape") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"Preprocess: give at most one of scale/target_spacing/target_shape, got {given}")
        for k in ("scale", "target_spacing", "target_shape"):
            v = getattr(self, k)
            if isinstance(v, list):
                object.__setattr__(self, k, tuple(v))
        vals = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        if self.scale is not None and any(not (isinstance(s, (int, float)) and s > 0) for s in vals):
            raise ConfigError(f"Preprocess.scale must be positive, got {self.scale!r}")
        for k in ("target_spacing", "target_shape"):
            v = getattr(self, k)
            if v is not None and any(x is not None and not x > 0 for x in v):
                raise ConfigError(f"Preprocess.{k} entries must be positive or None, got {v!r}")


def normalize_intensity(image: np.ndarray, mode: str = "zscore") -> np.ndarray:
    """Normalise a float32 ``[C, *spatial]`` image channel by channel (see :class:`Preprocess`)."""
    if mode not in NORMALIZE_MODES:
        raise ConfigError(f"normalize={mode!r}; use one of {NORMALIZE_MODES}")
    out = image.astype(np.float32, copy=True)
    if mode == "none":
        return out
    for c in range(out.shape[0]):
        x = out[c]
        if mode == "minmax":
            lo, hi = float(x.min()), float(x.max())
            x -= lo
            if hi > lo:
                x /= hi - lo
            continue
        mask = x != 0 if mode == "zscore_nonzero" else None
        vals = x[mask] if mask is not None else x
        if vals.size == 0:
            continue
        mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
        if mask is not None:
            x[mask] = (vals - mean) / (std if std > 0 else 1.0)
        else:
            x -= mean
            if std > 0:
                x /= std
    return out


def _target_size(pre: Preprocess, shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[int, ...]:
    nd = len(shape)

    def per_axis(v, what):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd
        if len(v) != nd:
            raise ConfigError(f"Preprocess.{what}={v!r} has {len(v)} entries for {nd} spatial dims")
        return v

    if pre.scale is not None:
        return tuple(max(1, round(s * f)) for s, f in zip(shape, per_axis(pre.scale, "scale")))
    if pre.target_spacing is not None:
        tsp = per_axis(pre.target_spacing, "target_spacing")
        return tuple(s if t is None else max(1, round(s * sp / t)) for s, sp, t in zip(shape, spacing, tsp))
    if pre.target_shape is not None:
        tsh = per_axis(pre.target_shape, "target_shape")
        return tuple(s if t is None else int(t) for s, t in zip(shape, tsh))
    return tuple(shape)


def resample(x: torch.Tensor, size: Sequence[int], labels: bool = False) -> torch.Tensor:
    """Resample ``x`` ``[C, *spatial]`` (1 to 3 spatial dims) to ``size``: linear / bilinear /
    trilinear with ``align_corners=False`` (voxel centres of both grids span the same extent),
    or ``nearest-exact`` with ``labels``. The same call maps a preprocessed grid back to the
    original one (``size`` = the original shape): that is how predictions are put back on each
    case's original grid. Raises ConfigError for more than 3 spatial dims."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[1:]) == size:
        return x
    nd = len(size)
    lin = {1: "linear", 2: "bilinear", 3: "trilinear"}.get(nd)
    if lin is None:
        raise ConfigError(f"cannot resample {nd} spatial dims")
    mode = "nearest-exact" if labels else lin
    return F.interpolate(x[None].float(), size=size, mode=mode, **({} if labels else {"align_corners": False}))[0]


def resize_case(case: Case, size: Sequence[int]) -> Case:
    """Resample a case to spatial ``size``: image bi/trilinear, label nearest-exact.

    Spacing scales by ``old/new`` per axis; a NIfTI affine is updated so voxel centres keep their
    world position (``align_corners=False`` geometry). 1D/2D/3D spatial all go through one path.
    """
    shape = tuple(case.label.shape)
    size = tuple(int(s) for s in size)
    if size == shape:
        return case
    nd = len(shape)
    img = resample(torch.from_numpy(np.ascontiguousarray(case.image)), size).numpy()
    lab = resample(torch.from_numpy(case.label.astype(np.float32))[None], size, labels=True)[0].numpy().astype(np.int64)
    ratio = np.array([o / n for o, n in zip(shape, size)], dtype=np.float64)
    spacing = tuple(float(sp * r) for sp, r in zip(case.spacing, ratio))
    affine = case.affine
    if affine is not None:
        affine = np.array(affine, dtype=np.float64, copy=True)
        rows = affine.shape[0] - 1
        # new voxel j has its centre at old (continuous) index ratio * j + (ratio - 1) / 2
        affine[:rows, -1] = affine[:rows, -1] + affine[:rows, :nd] @ (0.5 * (ratio - 1.0))
        affine[:rows, :nd] = affine[:rows, :nd] * ratio[None, :]
    return replace(case, image=np.ascontiguousarray(img, dtype=np.float32), label=lab,
                   spacing=spacing, affine=affine)


def preprocess_case(case: Case, pre: Preprocess | None) -> tuple[Case, dict[str, Any]]:
    """Normalise then resample one case; returns the new case and its meta dict
    (``original_shape``, ``original_spacing``, ``spacing``, ``affine``, ``source``, ``patient_id``)."""
    pre = pre or Preprocess()
    meta = {"original_shape": tuple(case.label.shape), "original_spacing": tuple(case.spacing)}
    case = replace(case, image=normalize_intensity(case.image, pre.normalize))
    case = resize_case(case, _target_size(pre, tuple(case.label.shape), tuple(case.spacing)))
    meta.update(spacing=tuple(case.spacing), affine=case.affine, source=case.source,
                patient_id=case.patient_id)
    return case, meta
