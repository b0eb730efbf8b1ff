"""Reading one case from its files: HDF5, oriented volumes (NIfTI, NRRD, DICOM series; read by
:mod:`.volume_files`, reoriented, see :mod:`.orientation`) and 2D image/mask files, with the checks of their arrays; also header-only probes of shape and spacing.

:func:`load_case` turns a :class:`~lorkd.data.segmentation.cases.CaseRef` into a
:class:`~lorkd.data.segmentation.cases.Case` holding the arrays; :func:`probe_case` and
:func:`probe_spacing` read headers only.

Errors: anything wrong with the input (missing file, corrupt or truncated file, missing key,
image/label shape mismatch, non-integer / negative labels, a label ``>= num_classes``, a mask value
outside the mapping) raises :class:`lorkd.errors.DataError` naming the file and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image

from lorkd.errors import DataError

from .cases import Case, CaseRef
from .orientation import CANONICAL_ORIENTATION, _reoriented_shape, reorient
from .volume_files import read_volume, read_volume_header

__all__ = ["hdf5_spacing", "load_case", "load_label", "probe_case", "probe_spacing", "read_hdf5_arrays"]


def _as_labels(label: np.ndarray, path: str, field_name: str, num_classes: int | None) -> np.ndarray:
    """Validate a label array and return it as int64. Raises DataError naming ``path`` and ``field_name``."""
    if label.dtype == np.bool_:
        label = label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        if not np.issubdtype(label.dtype, np.floating):
            raise DataError(f"{path}: field {field_name!r} has non-numeric dtype {label.dtype}")
        if not np.all(np.isfinite(label)) or not np.all(label == np.round(label)):
            raise DataError(f"{path}: field {field_name!r} holds non-integer label values")
    if label.size == 0:
        raise DataError(f"{path}: field {field_name!r} is empty")
    lo, hi = label.min(), label.max()
    if lo < 0:
        raise DataError(f"{path}: field {field_name!r} holds negative label value {lo}")
    if num_classes is not None and hi >= num_classes:
        raise DataError(
            f"{path}: field {field_name!r} holds label value {hi} >= num_classes={num_classes}"
        )
    return label.astype(np.int64, copy=False)


def _as_image(image: np.ndarray, label_shape: tuple[int, ...], path: str, field_name: str,
              channels_last: bool) -> np.ndarray:
    """Put ``image`` into float32 ``[C, *spatial]`` and check it against ``label_shape``."""
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
        raise DataError(f"{path}: field {field_name!r} has non-numeric dtype {image.dtype}")
    nd = len(label_shape)
    if image.ndim == nd:
        image = image[None]
    elif image.ndim == nd + 1:
        if channels_last:
            image = np.moveaxis(image, -1, 0)
    else:
        raise DataError(
            f"{path}: field {field_name!r} has shape {image.shape}, label has shape {label_shape}"
        )
    if tuple(image.shape[1:]) != tuple(label_shape):
        raise DataError(
            f"{path}: field {field_name!r} has spatial shape {tuple(image.shape[1:])} but the label "
            f"has shape {tuple(label_shape)}"
        )
    image = np.ascontiguousarray(image, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise DataError(f"{path}: field {field_name!r} holds NaN or infinite values")
    return image


# --------------------------------------------------------------------------------------------
# per-format loaders


def _load_hdf5(ref: CaseRef) -> Case:
    path = ref.image_path
    arrays, file_spacing = read_hdf5_arrays(path, (ref.image_key, ref.label_key))
    label = _as_labels(arrays[ref.label_key], path, ref.label_key, ref.num_classes)
    image = _as_image(arrays[ref.image_key], label.shape, path, ref.image_key, channels_last=False)
    return Case(ref.case_id, ref.patient_id, image, label, _hdf5_spacing(ref, label.ndim, file_spacing), None, path)


def read_hdf5_arrays(path: str, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], Any]:
    """``({key: array}, spacing attribute)`` of an HDF5 file: the datasets ``keys`` and the ``spacing``
    attribute of the first one's dataset, else of the file (``None`` when neither has one).

    Raises:
        DataError: a missing key (the file's keys listed), an unreadable file (names it)."""
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for key in keys:
                if key not in f:
                    raise DataError(f"{path}: missing key {key!r} (has {sorted(f.keys())})")
                arrays[key] = np.asarray(f[key][()])
            return arrays, f[keys[0]].attrs.get("spacing", f.attrs.get("spacing"))
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise DataError(f"{path}: cannot read HDF5 file (corrupt or truncated?): {err}") from err


def _hdf5_spacing(ref: CaseRef, nd: int, file_spacing) -> tuple[float, ...]:
    """Voxel size of an HDF5 case: the reader's ``spacing`` argument, else the file's ``spacing``
    attribute (on the file or on the image dataset), else 1.0 per axis (HDF5 has no standard
    header; the default makes distances "voxels", reported as mm of 1 mm voxels)."""
    return hdf5_spacing(dict(ref.meta).get("spacing"), file_spacing, nd, ref.image_path)


def hdf5_spacing(given: Any, file_spacing: Any, nd: int, path: str) -> tuple[float, ...]:
    """Voxel size per axis from ``given`` (``reader.spacing``), else ``file_spacing`` (the file's
    attribute), else 1.0 per axis. Raises DataError naming where a bad value came from."""
    where = "reader.spacing" if given is not None else f"attribute 'spacing' of {path}"
    value = given if given is not None else file_spacing
    if value is None:
        return (1.0,) * nd
    sp = np.asarray(value, dtype=np.float64).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, nd)
    if sp.size != nd or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise DataError(f"{where}: spacing must be one positive number or {nd} (one per spatial axis), got {value!r}")
    return tuple(float(x) for x in sp)


def _load_volume(ref: CaseRef) -> Case:
    """A case of oriented volume files (NIfTI, NRRD, DICOM series; :mod:`.volume_files`)."""
    image_raw, affine, image_zooms = read_volume(ref.image_path, "image")
    label_raw, label_affine, _ = read_volume(ref.label_path, "label")
    label = _as_labels(label_raw, ref.label_path, "label", ref.num_classes)
    image = _as_image(image_raw, label.shape, ref.image_path, "image", channels_last=True)
    n_mod = dict(ref.meta).get("n_modalities")
    if n_mod is not None and image.shape[0] != n_mod:
        raise DataError(
            f"{ref.image_path}: field 'image' has {image.shape[0]} channel(s) but dataset.json "
            f"'modality' lists {n_mod}"
        )
    nd = label.ndim
    orientation = None
    if nd == 3:
        label, _, orientation = reorient(label, label_affine, CANONICAL_ORIENTATION)
        image, affine, _ = reorient(image, affine, CANONICAL_ORIENTATION, channels_first=True)
        zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    else:
        zooms = tuple(image_zooms[:nd]) + (1.0,) * (nd - len(image_zooms[:nd]))
    return Case(ref.case_id, ref.patient_id, np.ascontiguousarray(image), np.ascontiguousarray(label), zooms,
                affine, ref.image_path, orientation)


def pil_open(path: str, field_name: str):
    """The PIL image at ``path``.

    Raises:
        DataError: missing or unreadable file (names ``field_name`` and the path).
    """
    if not Path(path).is_file():
        raise DataError(f"{field_name} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # detached from the file, which the with-block closes
    except (OSError, ValueError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: cannot read {field_name} (corrupt or truncated?): {err}") from err


def image_to_array(im) -> np.ndarray:
    """PIL image -> float32 ``[C, H, W]``: grayscale -> 1 channel, RGB/RGBA/palette -> 3 channels."""
    if im.mode in ("1", "LA"):
        im = im.convert("L")
    if im.mode in ("L", "I", "F") or im.mode.startswith("I;"):
        return np.asarray(im).astype(np.float32)[None]
    arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return np.moveaxis(arr, -1, 0)


def _mask_to_array(im, path: str) -> np.ndarray:
    """PIL mask -> raw integer ``[H, W]``.

    A palette mask whose palette is all gray (R=G=B, e.g. a GIF saved from a grayscale mask) gives
    its gray values; any other palette mask gives its palette indices (class-indexed PNGs). An RGB
    mask must be gray (R=G=B) and gives that value.
    """
    if im.mode == "1":
        return np.asarray(im, dtype=np.uint8)
    if im.mode == "P":
        idx = np.asarray(im).astype(np.int64)
        pal = np.asarray(im.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)
        if len(pal) and np.all(pal == pal[:, :1]) and idx.max() < len(pal):
            return pal[idx, 0]
        return idx
    if im.mode in ("L", "I") or im.mode.startswith("I;"):
        return np.asarray(im).astype(np.int64)
    if im.mode == "F":
        arr = np.asarray(im)
        if not np.all(arr == np.round(arr)):
            raise DataError(f"{path}: field 'mask' holds non-integer values")
        return arr.astype(np.int64)
    arr = np.asarray(im.convert("RGB"))
    if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise DataError(f"{path}: field 'mask' is a colour image; masks must be grayscale or palette")
    return arr[..., 0].astype(np.int64)


def _load_image(ref: CaseRef) -> Case:
    im = pil_open(ref.image_path, "image")
    mk = pil_open(ref.label_path, "mask")
    raw = _mask_to_array(mk, ref.label_path)
    if ref.label_values is not None:
        lut = {v: k for k, v in enumerate(ref.label_values)}
        uniq = np.unique(raw)
        bad = [int(v) for v in uniq if int(v) not in lut]
        if bad:
            raise DataError(
                f"{ref.label_path}: field 'mask' holds value(s) {bad} outside label_values "
                f"{list(ref.label_values)}"
            )
        mapped = np.zeros(raw.shape, dtype=np.int64)
        for v in uniq:
            mapped[raw == v] = lut[int(v)]
        raw = mapped
    label = _as_labels(raw, ref.label_path, "mask", ref.num_classes)
    image = _as_image(image_to_array(im), label.shape, ref.image_path, "image", channels_last=False)
    return Case(ref.case_id, ref.patient_id, image, label, (1.0, 1.0), None, ref.image_path)


_LOADERS = {"hdf5": _load_hdf5, "nifti": _load_volume, "image": _load_image}


def load_case(ref: CaseRef) -> Case:
    """Read the arrays of one case. Raises DataError (file and field named) on any bad input."""
    if isinstance(ref, Case):
        return ref
    try:
        loader = _LOADERS[ref.kind]
    except KeyError:
        raise DataError(f"unknown case kind {ref.kind!r} for {ref.image_path}") from None
    if not Path(ref.image_path).exists():  # a DICOM series is a folder
        raise DataError(f"image file not found: {ref.image_path}")
    return loader(ref)


def probe_case(ref: CaseRef) -> tuple[int, tuple[int, ...]]:
    """Return ``(in_channels, spatial_shape)`` from file headers only (no voxel data read).

    Raises DataError for a missing/unreadable file or a missing key.
    """
    if isinstance(ref, Case):
        return ref.in_channels, tuple(ref.label.shape)
    path = ref.image_path
    if not Path(path).exists():
        raise DataError(f"image file not found: {path}")
    if ref.kind == "hdf5":
        try:
            with h5py.File(path, "r") as f:
                for key in (ref.image_key, ref.label_key):
                    if key not in f:
                        raise DataError(f"{path}: missing key {key!r} (has {sorted(f.keys())})")
                ishape, lshape = tuple(f[ref.image_key].shape), tuple(f[ref.label_key].shape)
        except DataError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise DataError(f"{path}: cannot read HDF5 file (corrupt or truncated?): {err}") from err
        channels = ishape[0] if len(ishape) == len(lshape) + 1 else 1
        return int(channels), lshape
    if ref.kind == "nifti":
        ishape = read_volume_header(path)[0]
        lshape, label_affine, _ = read_volume_header(ref.label_path)
        channels = ishape[-1] if len(ishape) == len(lshape) + 1 else 1
        if len(lshape) == 3:
            lshape = _reoriented_shape(lshape, label_affine)
        return int(channels), tuple(lshape)
    if ref.kind == "image":
        try:
            with Image.open(path) as im:
                mode, (w, h) = im.mode, im.size
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"{path}: cannot read image header: {err}") from err
        gray = mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;")
        return (1 if gray else 3), (h, w)
    raise DataError(f"unknown case kind {ref.kind!r} for {path}")


def probe_spacing(ref: CaseRef | Case) -> tuple[float, ...]:
    """Voxel size per spatial axis of a case as :func:`load_case` would give it (NIfTI: from the
    header, in the canonical orientation; HDF5: ``reader.spacing``, the ``spacing`` attribute or
    1.0; 2D images: 1.0), reading headers only. Raises DataError like :func:`probe_case`."""
    if isinstance(ref, Case):
        return tuple(ref.spacing)
    _, shape = probe_case(ref)
    if ref.kind == "nifti":
        _, affine, zooms = read_volume_header(ref.image_path)
        if len(shape) == 3:
            affine = reorient(np.zeros((1, 1, 1)), affine)[1]
            return tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        zooms = tuple(zooms[: len(shape)])
        return zooms + (1.0,) * (len(shape) - len(zooms))
    if ref.kind == "hdf5":
        with h5py.File(ref.image_path, "r") as f:
            file_spacing = f[ref.image_key].attrs.get("spacing", f.attrs.get("spacing"))
        return _hdf5_spacing(ref, len(shape), file_spacing)
    return (1.0,) * len(shape)


def load_label(ref: CaseRef) -> np.ndarray:
    """Read and validate only the label of a case (int64 ``[*spatial]``); HDF5 skips the image."""
    if isinstance(ref, Case):
        return ref.label
    if ref.kind != "hdf5":
        return load_case(ref).label
    path = ref.image_path
    if not Path(path).is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if ref.label_key not in f:
                raise DataError(f"{path}: missing key {ref.label_key!r} (has {sorted(f.keys())})")
            raw = np.asarray(f[ref.label_key][()])
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise DataError(f"{path}: cannot read HDF5 file (corrupt or truncated?): {err}") from err
    return _as_labels(raw, path, ref.label_key, ref.num_classes)
