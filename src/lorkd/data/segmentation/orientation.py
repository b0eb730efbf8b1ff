"""Orientation of 3D NIfTI volumes: the canonical axis codes and exact flips / transposes to them."""

from __future__ import annotations

import numpy as np
from nibabel import orientations as nio

from lorkd.errors import DataError

__all__ = ["CANONICAL_ORIENTATION", "reorient"]


CANONICAL_ORIENTATION = "SPL"
"""Axis codes every 3D NIfTI volume is turned to on read: axis 0 runs to Superior (the axial
slices, inferior to superior), axis 1 to Posterior (image rows, anterior at the top), axis 2 to the
patient's Left (image columns, the patient's right on the left: radiological view). That is the
``(Z, Y, X)`` layout of ``SimpleITK.GetArrayFromImage`` on an LPS scan, slice axis first like the
ACDC HDF5 files' ``(Z, H, W)``, so ``volume[k]`` is an axial slice and a 2D network (``slice_mode``) runs slice by slice along axis 0.
A volume stored otherwise is flipped and/or transposed (exact, no interpolation); spacing and
affine follow the arrays."""


def reorient(array: np.ndarray, affine: np.ndarray, to: str = CANONICAL_ORIENTATION,
             channels_first: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Flip / transpose a 3D volume so that its axes follow the axis codes ``to``.

    Exact (no interpolation): only axis permutations and flips, chosen by nibabel from the
    closest axes of ``affine``. Reorienting the result back to the returned ``from`` codes with
    the returned affine gives the input array and affine again.

    Args:
        array: ``[X, Y, Z]`` (or ``[C, X, Y, Z]`` with ``channels_first``).
        affine: 4x4 voxel-to-world matrix of ``array``.
        to: three axis codes, e.g. ``"SPL"``, ``"RAS"`` or ``"LPS"``.

    Returns:
        ``(array, affine, from_codes)``: the reoriented array (a view where possible), its affine,
        and the axis codes of the input (e.g. ``"LPS"``).

    Raises:
        DataError (a ValueError): ``array`` is not 3D, or the affine / codes are unusable.
    """
    spatial = array.shape[1:] if channels_first else array.shape
    if len(spatial) != 3:
        raise DataError(f"reorient: need a 3D volume, got shape {array.shape}")
    try:
        current = nio.io_orientation(affine)
        transform = nio.ornt_transform(current, nio.axcodes2ornt(tuple(to)))
    except Exception as err:  # nibabel raises ValueError / OrientationError for degenerate input
        raise DataError(f"reorient: cannot turn affine {np.asarray(affine).tolist()} to {to!r}: {err}") from err
    codes = "".join(nio.ornt2axcodes(current))
    moved = np.moveaxis(array, 0, -1) if channels_first else array
    out = nio.apply_orientation(moved, transform)
    if channels_first:
        out = np.moveaxis(out, -1, 0)
    new_affine = np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(transform, spatial)
    return out, new_affine, codes


def _reoriented_shape(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, ...]:
    """The spatial shape a 3D NIfTI of ``shape`` has after :func:`reorient` to the canonical codes."""
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(CANONICAL_ORIENTATION)))
    out = [0, 0, 0]
    for i, (axis, _) in enumerate(transform):
        out[int(axis)] = shape[i]
    return tuple(out)
