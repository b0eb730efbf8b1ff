"""One image to segment, without a label, read by the same readers as training's cases: what
``lorkd predict`` reads.

>>> item = read_input_image(Path("scan.nrrd"))     # NIfTI, NRRD, DICOM series, HDF5 or a 2D image
>>> item.image.shape, item.spacing, item.affine    # [C, *spatial] float32, mm per axis, 4x4 or None

Formats (each through the reader training uses): NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``,
``.nhdr``) and a folder holding one DICOM series, by :func:`~.volume_files.read_volume` (voxels in
the file's axis order, a RAS+ affine, spacing in mm; a channel axis last becomes the first); HDF5
(``.h5``, ``.hdf5``; dataset ``image``, ``[*spatial]`` or ``[C, D, H, W]``) by
:func:`~.formats.read_hdf5_arrays` with its ``spacing`` attribute (else 1.0 per axis, as training);
2D images (PNG, JPEG, TIFF, GIF, BMP) by :func:`~.formats.pil_open` / :func:`~.formats.image_to_array`.
Volumes are not reoriented here: a caller that needs the canonical axes uses :func:`.reorient`
with ``affine``.

Errors: :class:`lorkd.errors.DataError` naming the file: missing, unreadable, unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorkd.errors import DataError

from .formats import hdf5_spacing, image_to_array, pil_open, read_hdf5_arrays
from .volume_files import VOLUME_SUFFIXES, read_volume

__all__ = ["IMAGE_SUFFIXES", "INPUT_SUFFIXES", "InputImage", "input_suffix", "read_input_image", "series_folders"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
HDF5_SUFFIXES = (".h5", ".hdf5")
#: every file suffix a segmentation input may have (a DICOM series is a folder instead)
INPUT_SUFFIXES = (*VOLUME_SUFFIXES, *HDF5_SUFFIXES, *IMAGE_SUFFIXES)


@dataclass
class InputImage:
    """One image read for inference.

    Attributes:
        image: float32 ``[C, *spatial]`` in the file's own axis order.
        spacing: voxel size per spatial axis (mm; 1.0 where the file has none).
        affine: 4x4 voxel-to-world (RAS+) of an oriented volume (NIfTI, NRRD, DICOM), else ``None``.
        kind: ``"nifti"``, ``"nrrd"``, ``"dicom"``, ``"hdf5"`` or ``"image"``.
        path: the file (or the DICOM series' folder).
    """

    image: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    kind: str
    path: Path


def input_suffix(path: str | Path) -> str:
    """The input suffix of ``path`` (``.nii.gz`` whole), lower case; ``""`` for a folder."""
    path = Path(path)
    if path.is_dir():
        return ""
    name = path.name.lower()
    return next((s for s in INPUT_SUFFIXES if name.endswith(s)), path.suffix.lower())


def series_folders(folder: Path) -> list[Path]:
    """The DICOM series ``folder`` stands for when it holds no file with an input suffix: itself when
    it holds files (one series), else its subfolders that hold files (one series each), sorted;
    ``[]`` when it holds input files or nothing of the kind. Hidden entries are skipped."""
    def files(d: Path) -> list[Path]:
        return [p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]

    here = files(folder)
    if any(p.name.lower().endswith(INPUT_SUFFIXES) for p in here):
        return []
    if here:
        return [folder]
    subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    return [d for d in subs if files(d) and not any(p.name.lower().endswith(INPUT_SUFFIXES) for p in files(d))]


def read_input_image(path: str | Path, image_key: str = "image") -> InputImage:
    """Read one image to segment (see the module docstring for the formats).

    Args:
        path: a file, or a folder holding one DICOM series.
        image_key: the HDF5 dataset of the image.

    Raises:
        DataError: a missing, unreadable or unsupported file (names it; a DICOM or NRRD file
            without pydicom / pynrrd names the ``pip install`` that helps).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    kind = input_suffix(path)
    if path.is_dir() or kind in VOLUME_SUFFIXES:
        data, affine, spacing = read_volume(path, "image")
        volume = "dicom" if path.is_dir() else VOLUME_SUFFIXES[kind]
        image = np.moveaxis(data, -1, 0) if data.ndim == 4 else data[None]
        return InputImage(_float(image), tuple(spacing[: image.ndim - 1]), affine, volume, path)
    if kind in HDF5_SUFFIXES:
        arrays, file_spacing = read_hdf5_arrays(str(path), (image_key,))
        data = arrays[image_key]
        image = data if data.ndim == 4 else data[None]
        return InputImage(_float(image), hdf5_spacing(None, file_spacing, image.ndim - 1, str(path)), None, "hdf5", path)
    if kind in IMAGE_SUFFIXES:
        return InputImage(image_to_array(pil_open(str(path), "image")), (1.0, 1.0), None, "image", path)
    raise DataError(f"{path}: unsupported input type {kind!r}; give NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), HDF5 "
                    f"(.h5), image files ({'/'.join(IMAGE_SUFFIXES)}) or a folder holding one DICOM series")


def _float(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image, dtype=np.float32)
