"""Random augmentation of segmentation training patches (image and label together).

One :class:`Augment` serves 2D and 3D patches (``[C, H, W]`` / ``[C, D, H, W]`` images with
``[H, W]`` / ``[D, H, W]`` labels). It draws every random number from the ``numpy`` generator it is
given, so a patch's augmentation is a pure function of that generator's seed:
:class:`~lorkd.data.segmentation.PatchDataset` seeds it from ``(seed, epoch, index)``, which keeps
training reproducible and a resumed run identical to an uninterrupted one.

Order of the steps (each drawn independently):

1. **flip** each axis in ``flip_axes`` (default: every spatial axis) with probability ``flip``;
2. with probability ``affine``: a **rotation** by an angle uniform in ``[-rotate, rotate]``
   degrees in the plane of the last two spatial axes (for 3D: in-plane, about the first axis,
   which is the slice axis of most anisotropic scans), and a **zoom** by a factor uniform in
   ``[1 - scale, 1 + scale]`` on every axis, about the patch centre, in voxel units (non-square
   patches are not sheared). The image is resampled bilinearly/trilinearly, the label with nearest
   neighbour, both with border padding (the edge values extend);
3. with probability ``intensity``: per channel, ``x * (1 + a) + b`` with ``a`` uniform in
   ``[-intensity_scale, intensity_scale]`` and ``b`` uniform in ``[-intensity_shift,
   intensity_shift]`` (units of the normalised image);
4. with probability ``intensity``: additive Gaussian noise of standard deviation ``noise``.

The label is never interpolated (flips and nearest-neighbour sampling only), so its values stay
class indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lorkd.errors import ConfigError

__all__ = ["Augment"]


@dataclass(frozen=True)
class Augment:
    """Seeded flips, small affine and intensity changes of a training patch (see the module doc).

    Raises ConfigError (naming the field) for a probability outside ``[0, 1]``, a negative range,
    or ``scale >= 1``.
    """

    flip: float = 0.5
    flip_axes: tuple[int, ...] | None = None
    affine: float = 0.5
    rotate: float = 15.0
    scale: float = 0.1
    intensity: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    noise: float = 0.05

    def __post_init__(self) -> None:
        self.check_settings(self, "augment")
        if self.flip_axes is not None:
            object.__setattr__(self, "flip_axes", tuple(int(a) for a in self.flip_axes))

    @staticmethod
    def check_settings(settings: object, path: str) -> None:
        """Check the fields of ``settings`` (an Augment or anything with the same attributes, e.g.
        the config section); a ConfigError names ``<path>.<field>``."""
        for name in ("flip", "affine", "intensity"):
            v = getattr(settings, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{path}.{name}: must be a probability in [0, 1], got {v!r}")
        for name in ("rotate", "scale", "intensity_scale", "intensity_shift", "noise"):
            v = getattr(settings, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{path}.{name}: must be a number >= 0, got {v!r}")
        if settings.scale >= 1.0:
            raise ConfigError(f"{path}.scale: the zoom range 1 +- scale needs scale < 1, got {settings.scale!r}")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Augment one patch.

        Args:
            image: float32 ``[C, *spatial]`` (2 or 3 spatial dims; 1 allowed for flips/intensity).
            label: integer ``[*spatial]``.
            rng: the generator every random draw comes from.

        Returns:
            ``(image, label)``: float32 ``[C, *spatial]`` and int64 ``[*spatial]``, same shapes.

        Raises:
            ConfigError: a ``flip_axes`` entry outside the patch's spatial axes.
        """
        nd = label.ndim
        axes = range(nd) if self.flip_axes is None else self.flip_axes
        for a in axes:
            if not -nd <= a < nd:
                raise ConfigError(f"augment.flip_axes: axis {a} outside the {nd} spatial axes of the patch")
            if rng.random() < self.flip:
                image = np.flip(image, axis=1 + (a % nd))
                label = np.flip(label, axis=a % nd)
        image = np.ascontiguousarray(image, dtype=np.float32)
        label = np.ascontiguousarray(label).astype(np.int64)
        if nd >= 2 and rng.random() < self.affine:
            angle = math.radians(rng.uniform(-self.rotate, self.rotate))
            zoom = rng.uniform(1.0 - self.scale, 1.0 + self.scale)
            image, label = _affine(image, label, angle, zoom)
        if rng.random() < self.intensity:
            a = rng.uniform(-self.intensity_scale, self.intensity_scale, size=image.shape[0])
            b = rng.uniform(-self.intensity_shift, self.intensity_shift, size=image.shape[0])
            shape = (-1,) + (1,) * nd
            image = image * (1.0 + a.reshape(shape)).astype(np.float32) + b.reshape(shape).astype(np.float32)
        if self.noise > 0 and rng.random() < self.intensity:
            image = image + rng.normal(0.0, self.noise, size=image.shape).astype(np.float32)
        return np.ascontiguousarray(image, dtype=np.float32), label


def _affine(image: np.ndarray, label: np.ndarray, angle: float, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by ``angle`` (radians) in the plane of the last two axes and zoom by ``zoom``, about
    the centre, in voxel units; image (bi/tri)linear, label nearest; border padding."""
    nd = label.ndim
    size = label.shape
    # affine_grid works in normalised coordinates ordered (x=last axis, y, z); converting from
    # voxel units with diag(half sizes) keeps the rotation rigid on non-square patches
    half = torch.tensor([s / 2.0 for s in reversed(size)], dtype=torch.float64)
    rot = torch.eye(nd, dtype=torch.float64)
    c, s = math.cos(angle), math.sin(angle)
    rot[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    mat = torch.diag(1.0 / half) @ rot @ torch.diag(half) / zoom  # output -> input sampling positions
    theta = torch.cat([mat, torch.zeros(nd, 1, dtype=torch.float64)], dim=1)[None].float()
    grid = F.affine_grid(theta, [1, 1, *size], align_corners=False)
    img = F.grid_sample(torch.from_numpy(image)[None], grid, mode="bilinear", padding_mode="border",
                        align_corners=False)[0]
    lab = F.grid_sample(torch.from_numpy(label.astype(np.float32))[None, None], grid, mode="nearest",
                        padding_mode="border", align_corners=False)[0, 0]
    return img.numpy(), lab.round().numpy().astype(np.int64)
