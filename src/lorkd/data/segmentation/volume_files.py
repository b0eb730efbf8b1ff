"""Reading oriented volume files: NIfTI (nibabel), NRRD (pynrrd) and DICOM series (pydicom).

Every reader returns the voxels in the file's own axis order, ``[X, Y, Z]`` (``[X, Y, Z, C]`` with a
channel axis last), with a 4x4 voxel-to-world affine in nibabel's RAS+ convention and the voxel size
per spatial axis, so :mod:`.formats` treats all three alike (reorientation to the canonical
orientation, spacing in mm). Which reader: by path, :func:`volume_format` (``.nii``/``.nii.gz``,
``.nrrd``/``.nhdr``, a folder = a DICOM series).

* NRRD: ``space directions`` (one row per axis) and ``space origin`` in the header's ``space``
  (LPS or RAS; LPS is turned to RAS); an axis without a direction (``none``) is the channel axis;
  without ``space directions`` the ``spacings`` field gives a diagonal affine.
* DICOM series: the folder's files are the slices of one series (one ``SeriesInstanceUID``), sorted
  by ``ImagePositionPatient`` along the slice normal (``ImageOrientationPatient`` row x column
  cosines), whatever the file names or ``InstanceNumber``; in-plane spacing from ``PixelSpacing``,
  slice spacing from the positions (must be uniform); voxel values ``raw * RescaleSlope +
  RescaleIntercept``. The array is ``[columns, rows, slices]``.

pynrrd and pydicom are optional (``pip install lorkd[volumes]``), imported when a file needs them.

Errors: :class:`lorkd.errors.DataError` naming the file: missing, unreadable or corrupt files, a
missing package (with the ``pip install`` that helps), DICOM files of several series, duplicate or
unevenly spaced slice positions, an unknown NRRD ``space``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lorkd.errors import DataError

__all__ = ["VOLUME_SUFFIXES", "read_volume", "read_volume_header", "volume_format"]

VOLUME_SUFFIXES = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_SPACES = {"right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1), "left-posterior-superior": (-1, -1, 1),
           "lps": (-1, -1, 1), "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}
_SLICE_TOLERANCE = 1e-2  # relative spread of the slice gaps of a DICOM series accepted as uniform


def volume_format(path: str | Path) -> str:
    """``"nifti"``, ``"nrrd"`` or ``"dicom"`` (a folder) for ``path``.

    Raises:
        DataError: the path does not exist or has no known volume suffix.
    """
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for suffix, kind in VOLUME_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    if not path.exists():
        raise DataError(f"volume file not found: {path}")
    raise DataError(f"{path}: not a volume file: give NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or a folder of "
                    "DICOM slices")


def read_volume(path: str | Path, field_name: str = "image") -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """``(array, affine, spacing)`` of a volume file: ``array`` ``[*spatial]`` or ``[*spatial, C]``,
    ``affine`` 4x4 (RAS+), ``spacing`` per spatial axis (mm). Raises DataError naming the file."""
    path = Path(path)
    kind = volume_format(path)
    if kind == "nrrd":
        return _read_nrrd(path, field_name)
    if kind == "dicom":
        return _read_dicom(path, field_name)
    img = _nib_load(path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as err:  # truncated gzip: EOFError / OSError / zlib.error
        raise DataError(f"{path}: cannot read {field_name} voxel data (truncated?): {err}") from err
    return data, np.asarray(img.affine, dtype=np.float64), _nifti_zooms(img)


def read_volume_header(path: str | Path) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    """``(shape, affine, spacing)`` of a volume file from its header(s) only (shape as in :func:`read_volume`)."""
    path = Path(path)
    kind = volume_format(path)
    if kind == "nrrd":
        header = _nrrd_header(path)
        spatial, channel = _nrrd_axes(header, path)
        sizes = [int(s) for s in header["sizes"]]
        shape = tuple(sizes[a] for a in spatial) + ((sizes[channel],) if channel is not None else ())
        return (shape, *_nrrd_geometry(header, spatial, path))
    if kind == "dicom":
        slices = _dicom_slices(path, pixels=False)
        affine, spacing = _dicom_geometry(slices, path)
        return (int(slices[0].Columns), int(slices[0].Rows), len(slices)), affine, spacing
    img = _nib_load(path)
    return tuple(img.shape), np.asarray(img.affine, dtype=np.float64), _nifti_zooms(img)


# ------------------------------------------------------------------------------------------- NIfTI
def _nib_load(path: Path):
    if not path.is_file():
        raise DataError(f"NIfTI file not found: {path}")
    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors
        raise DataError(f"{path}: cannot read NIfTI header: {err}") from err


def _nifti_zooms(img) -> tuple[float, ...]:
    nd = min(len(img.shape), 3)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:nd])
    return zooms + (1.0,) * (nd - len(zooms))


# -------------------------------------------------------------------------------------------- NRRD
def _import_nrrd(path: Path) -> Any:
    try:
        import nrrd
    except ImportError:
        raise _missing(path, "NRRD files", "pynrrd") from None
    return nrrd


def _missing(path: Path, what: str, package: str) -> DataError:
    return DataError(f"{path}: reading {what} needs the {package} package, which is not installed: "
                     f"pip install lorkd[volumes] (or pip install {package})")


def _nrrd_header(path: Path) -> dict[str, Any]:
    nrrd = _import_nrrd(path)
    if not path.is_file():
        raise DataError(f"NRRD file not found: {path}")
    try:
        return dict(nrrd.read_header(str(path)))
    except Exception as err:  # pynrrd raises NRRDError, UnicodeDecodeError, ValueError, OSError
        raise DataError(f"{path}: cannot read NRRD header (corrupt?): {type(err).__name__}: {err}") from err


def _read_nrrd(path: Path, field_name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    nrrd = _import_nrrd(path)
    if not path.is_file():
        raise DataError(f"NRRD file not found: {path}")
    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as err:  # corrupt header, truncated or undecodable data
        raise DataError(f"{path}: cannot read NRRD {field_name} (corrupt or truncated?): "
                        f"{type(err).__name__}: {err}") from err
    spatial, channel = _nrrd_axes(header, path)
    data = np.asarray(data)
    if channel is not None:
        data = np.moveaxis(data, channel, -1)
    return (data, *_nrrd_geometry(header, spatial, path))


def _nrrd_axes(header: dict[str, Any], path: Path) -> tuple[list[int], int | None]:
    """The spatial axes (with a direction) and the one channel axis (direction ``none``) of the file."""
    dims = int(header.get("dimension", len(header.get("sizes", []))))
    directions = header.get("space directions")
    if directions is None:
        spatial = list(range(dims))
    else:
        spatial = [i for i, row in enumerate(np.asarray(directions, dtype=np.float64))
                   if np.all(np.isfinite(row))]
    others = [i for i in range(dims) if i not in spatial]
    if len(others) > 1 or not 2 <= len(spatial) <= 3:
        raise DataError(f"{path}: NRRD with {len(spatial)} spatial and {len(others)} other axes; expected 2 or 3 "
                        "spatial axes and at most one channel axis")
    return spatial, (others[0] if others else None)


def _nrrd_geometry(header: dict[str, Any], spatial: list[int], path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """4x4 RAS+ affine and spacing of the spatial axes from ``space directions`` / ``space origin``."""
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is None:
        spacings = np.asarray(header.get("spacings", [1.0] * len(spatial)), dtype=np.float64)[spatial]
        spacings = np.where(np.isfinite(spacings), spacings, 1.0)
        affine[range(len(spatial)), range(len(spatial))] = spacings
        return affine, tuple(float(s) for s in spacings)
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _SPACES:
        raise DataError(f"{path}: NRRD space {header.get('space')!r} is not one of {sorted(_SPACES)}")
    rows = np.asarray(directions, dtype=np.float64)[spatial]  # one row per spatial axis
    origin = np.asarray(header.get("space origin", np.zeros(rows.shape[1])), dtype=np.float64)
    sign = np.asarray(_SPACES[space][: rows.shape[1]], dtype=np.float64)
    n, d = rows.shape
    affine[:d, :n] = (rows * sign).T
    affine[:d, 3] = origin * sign
    return affine, tuple(float(s) for s in np.linalg.norm(rows, axis=1))


# ------------------------------------------------------------------------------------------- DICOM


def _dicom_slices(folder: Path, pixels: bool) -> list[Any]:
    """The datasets of the series in ``folder``, sorted along the slice normal."""
    try:
        import pydicom
    except ImportError:
        raise _missing(folder, "DICOM series", "pydicom") from None
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")
    if not files:
        raise DataError(f"{folder}: no DICOM files in this series folder")
    slices = []
    for p in files:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=not pixels)
        except Exception as err:  # InvalidDicomError, truncated pixel data, unsupported transfer syntax
            raise DataError(f"{p}: cannot read DICOM slice (corrupt or not DICOM?): {type(err).__name__}: {err}") from err
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if tag not in ds:
                raise DataError(f"{p}: DICOM slice without {tag}")
        if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            raise DataError(f"{p}: DICOM slice with {ds.SamplesPerPixel} samples per pixel; only grayscale series")
        slices.append(ds)
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise DataError(f"{folder}: DICOM files of {len(series)} series; put each series in its own folder")
    normal = _normal(slices[0])
    return sorted(slices, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


def _normal(ds: Any) -> np.ndarray:
    cosines = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    return np.cross(cosines[:3], cosines[3:])


def _dicom_geometry(slices: list[Any], folder: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """4x4 RAS+ affine of ``[columns, rows, slices]`` and its spacing; checks the slice gaps."""
    first = slices[0]
    cosines = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(s) for s in first.PixelSpacing)
    positions = np.asarray([ds.ImagePositionPatient for ds in slices], dtype=np.float64)
    normal = _normal(first)
    if len(slices) > 1:
        gaps = np.diff(positions @ normal)
        if np.min(gaps) <= 1e-6:
            raise DataError(f"{folder}: two DICOM slices at the same position {positions[np.argmin(gaps)].tolist()}")
        if np.ptp(gaps) > _SLICE_TOLERANCE * np.mean(gaps):
            raise DataError(f"{folder}: DICOM slice gaps are not uniform ({np.min(gaps):.4g} to {np.max(gaps):.4g} mm); "
                            "resample the series or give it as NIfTI")
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        step = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = cosines[:3] * col_spacing  # along a row: the column index grows
    lps[:3, 1] = cosines[3:] * row_spacing  # down a column: the row index grows
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = np.eye(4)
    affine[:3] = _LPS_TO_RAS @ lps[:3]
    return affine, (col_spacing, row_spacing, float(np.linalg.norm(step)))


def _read_dicom(folder: Path, field_name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    slices = _dicom_slices(folder, pixels=True)
    affine, spacing = _dicom_geometry(slices, folder)
    planes = []
    for ds in slices:
        try:
            raw = np.asarray(ds.pixel_array)
        except Exception as err:  # truncated pixel data, a compressed syntax without its decoder
            raise DataError(f"{ds.filename}: cannot read the DICOM pixel data (corrupt or truncated?): "
                            f"{type(err).__name__}: {err}") from err
        if raw.shape != (int(slices[0].Rows), int(slices[0].Columns)):
            raise DataError(f"{folder}: DICOM {field_name} slice {ds.filename} has shape {raw.shape}, the first "
                            f"{(int(slices[0].Rows), int(slices[0].Columns))}")
        slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append(raw.T if slope == 1 and intercept == 0 else raw.T * slope + intercept)
    return np.stack(planes, axis=-1), affine, spacing
