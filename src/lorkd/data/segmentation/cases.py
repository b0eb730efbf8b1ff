"""The records of segmentation data: :class:`CaseRef` (where one case lives and how to read it) and
:class:`Case` (its loaded arrays).

Array conventions of a loaded :class:`Case`:

- ``image``: float32 ``[C, *spatial]``, channels first; spatial is ``(D, H, W)`` for 3D and
  ``(H, W)`` for 2D. Spatial axes keep the file's order (the ACDC HDF5 files store ``(Z, H, W)``,
  the left-atrium files ``(X, Y, Z)``); 3D NIfTI volumes are reoriented on read to
  :data:`~lorkd.data.segmentation.orientation.CANONICAL_ORIENTATION` (``SPL``: axis 0 towards
  Superior, 1 Posterior, 2 Left), their affine and spacing with them, and :attr:`Case.orientation`
  keeps the file's own codes.
- ``label``: int64 ``[*spatial]`` with class indices ``0 .. K-1`` (0 is background).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Case", "CaseRef"]


@dataclass(eq=False)
class Case:
    """One loaded case (compared and hashed by identity, so it can key a cache like a CaseRef).

    Attributes:
        case_id: unique id within its data set (file stem).
        patient_id: the patient the case belongs to (splits never separate one patient's cases).
        image: float32 ``[C, *spatial]``.
        label: int64 ``[*spatial]``, class indices.
        spacing: voxel size per spatial axis (1.0 where the file does not say).
        affine: 4x4 voxel-to-world matrix for NIfTI (of the arrays as held, i.e. after
            reorientation to :data:`CANONICAL_ORIENTATION`), ``None`` otherwise.
        source: path of the image file.
        orientation: the axis codes of the file as stored (e.g. ``"LPS"``) for a 3D NIfTI,
            ``None`` otherwise; :func:`reorient` to it gives back the file's own voxel order.
    """

    case_id: str
    patient_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    source: str
    orientation: str | None = None

    @property
    def spatial_dims(self) -> int:
        return self.label.ndim

    @property
    def in_channels(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class CaseRef:
    """Where one case lives and how to read it; hashable, so it can key a cache.

    ``kind`` is ``"hdf5"``, ``"nifti"`` or ``"image"``. ``image_key``/``label_key`` are the HDF5
    dataset names. ``num_classes`` (if set) bounds the labels. ``label_values`` (2D masks) lists the
    raw mask values in class order: raw value ``label_values[k]`` becomes class ``k``.
    """

    case_id: str
    patient_id: str
    image_path: str
    label_path: str
    kind: str
    image_key: str = "image"
    label_key: str = "label"
    num_classes: int | None = None
    label_values: tuple[int, ...] | None = None
    meta: tuple = field(default=(), compare=False)

    def with_num_classes(self, num_classes: int | None) -> CaseRef:
        """Return a copy with ``num_classes`` set."""
        return CaseRef(
            self.case_id, self.patient_id, self.image_path, self.label_path, self.kind,
            self.image_key, self.label_key, num_classes, self.label_values, self.meta,
        )
