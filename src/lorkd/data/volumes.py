"""Readers for segmentation data: HDF5 volume folders, MSD (NIfTI) data sets, 2D image/mask folders.

Every reader scans a folder and returns one record per case. By default (``lazy=True``) the records
are :class:`CaseRef` (ids and paths only, cheap to scan, hashable); :func:`load_case` turns a ref into
a :class:`Case` holding the arrays. ``lazy=False`` loads (and so fully validates) every case at once.

Array conventions of a loaded :class:`Case`:

- ``image``: float32 ``[C, *spatial]``, channels first; spatial is ``(D, H, W)`` for 3D and
  ``(H, W)`` for 2D. Spatial axes keep the file's order (the ACDC HDF5 files store ``(Z, H, W)``,
  the left-atrium files ``(X, Y, Z)``); 3D NIfTI volumes are reoriented on read to
  :data:`CANONICAL_ORIENTATION` (``SPL``: axis 0 towards Superior, 1 Posterior, 2 Left), their
  affine and spacing with them, and :attr:`Case.orientation` keeps the file's own codes.
- ``label``: int64 ``[*spatial]`` with class indices ``0 .. K-1`` (0 is background).

Errors: anything wrong with the input (missing folder or file, no cases, corrupt or truncated file,
missing key, image/label shape mismatch, non-integer / negative labels, a label ``>= num_classes``,
a mask value outside the mapping) raises :class:`lorkd.errors.DataError` naming the file and field.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorkd.errors import ConfigError, DataError

log = logging.getLogger("lorkd")

__all__ = [
    "CANONICAL_ORIENTATION",
    "Case",
    "CaseRef",
    "load_case",
    "load_label",
    "probe_case",
    "probe_spacing",
    "reorient",
    "default_patient_rule",
    "read_hdf5_folder",
    "read_msd_folder",
    "read_image_mask_folder",
    "scan_label_values",
]

PatientRule = Callable[[str], str] | str | None


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


# --------------------------------------------------------------------------------------------
# helpers


def default_patient_rule(stem: str) -> str:
    """Patient id from a file stem: the text before the first ``_frame`` (ACDC), else the stem."""
    i = stem.find("_frame")
    return stem[:i] if i > 0 else stem


def _patient_fn(rule: PatientRule) -> Callable[[str], str]:
    """Turn ``patient_rule`` (None, a callable, or a regex whose group 1 / match is the id) into a function."""
    if rule is None:
        return default_patient_rule
    if callable(rule):
        return rule
    if isinstance(rule, str):
        pattern = re.compile(rule)

        def fn(stem: str) -> str:
            m = pattern.search(stem)
            if m is None:
                return stem
            return m.group(1) if m.groups() else m.group(0)

        return fn
    raise DataError(f"patient_rule must be None, a callable or a regex string, got {rule!r}")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5", ".hdf5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} folder not found: {path}")
    return path


def _check_unique(refs: Sequence[CaseRef], root: Path) -> None:
    seen: dict[str, str] = {}
    for r in refs:
        if r.case_id in seen:
            raise DataError(
                f"duplicate case id {r.case_id!r} in {root}: {seen[r.case_id]} and {r.image_path}"
            )
        seen[r.case_id] = r.image_path


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
    import h5py

    path = ref.image_path
    try:
        with h5py.File(path, "r") as f:
            arrays = {}
            for key in (ref.image_key, ref.label_key):
                if key not in f:
                    raise DataError(f"{path}: missing key {key!r} (has {sorted(f.keys())})")
                arrays[key] = np.asarray(f[key][()])
            file_spacing = f[ref.image_key].attrs.get("spacing", f.attrs.get("spacing"))
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        raise DataError(f"{path}: cannot read HDF5 file (corrupt or truncated?): {err}") from err
    label = _as_labels(arrays[ref.label_key], path, ref.label_key, ref.num_classes)
    image = _as_image(arrays[ref.image_key], label.shape, path, ref.image_key, channels_last=False)
    return Case(ref.case_id, ref.patient_id, image, label, _hdf5_spacing(ref, label.ndim, file_spacing), None, path)


def _hdf5_spacing(ref: CaseRef, nd: int, file_spacing) -> tuple[float, ...]:
    """Voxel size of an HDF5 case: the reader's ``spacing`` argument, else the file's ``spacing``
    attribute (on the file or on the image dataset), else 1.0 per axis (HDF5 has no standard
    header; the default makes distances "voxels", reported as mm of 1 mm voxels)."""
    given = dict(ref.meta).get("spacing")
    where = "reader.spacing" if given is not None else f"attribute 'spacing' of {ref.image_path}"
    value = given if given is not None else file_spacing
    if value is None:
        return (1.0,) * nd
    sp = np.asarray(value, dtype=np.float64).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, nd)
    if sp.size != nd or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise DataError(f"{where}: spacing must be one positive number or {nd} (one per spatial axis), got {value!r}")
    return tuple(float(x) for x in sp)


def _nib_load(path: str):
    import nibabel as nib

    if not Path(path).is_file():
        raise DataError(f"NIfTI file not found: {path}")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors
        raise DataError(f"{path}: cannot read NIfTI header: {err}") from err


def _nib_data(img, path: str, field_name: str) -> np.ndarray:
    try:
        return np.asarray(img.dataobj)
    except Exception as err:  # truncated gzip: EOFError / OSError / zlib.error
        raise DataError(f"{path}: cannot read {field_name} voxel data (truncated?): {err}") from err


def _load_nifti(ref: CaseRef) -> Case:
    img = _nib_load(ref.image_path)
    lab = _nib_load(ref.label_path)
    label_raw = _nib_data(lab, ref.label_path, "label")
    label = _as_labels(label_raw, ref.label_path, "label", ref.num_classes)
    image_raw = _nib_data(img, ref.image_path, "image")
    image = _as_image(image_raw, label.shape, ref.image_path, "image", channels_last=True)
    n_mod = dict(ref.meta).get("n_modalities")
    if n_mod is not None and image.shape[0] != n_mod:
        raise DataError(
            f"{ref.image_path}: field 'image' has {image.shape[0]} channel(s) but dataset.json "
            f"'modality' lists {n_mod}"
        )
    nd = label.ndim
    affine = np.asarray(img.affine, dtype=np.float64)
    orientation = None
    if nd == 3:
        label, _, orientation = reorient(label, affine, CANONICAL_ORIENTATION)
        image, affine, _ = reorient(image, affine, CANONICAL_ORIENTATION, channels_first=True)
        zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    else:
        zooms = tuple(float(z) for z in img.header.get_zooms()[:nd])
        zooms = zooms + (1.0,) * (nd - len(zooms))
    return Case(ref.case_id, ref.patient_id, np.ascontiguousarray(image), np.ascontiguousarray(label), zooms,
                affine, ref.image_path, orientation)


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
    from nibabel import orientations as nio

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
    from nibabel import orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(CANONICAL_ORIENTATION)))
    out = [0, 0, 0]
    for i, (axis, _) in enumerate(transform):
        out[int(axis)] = shape[i]
    return tuple(out)


def _pil_open(path: str, field_name: str):
    from PIL import Image

    if not Path(path).is_file():
        raise DataError(f"{field_name} file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # detached from the file, which the with-block closes
    except (OSError, ValueError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
        raise DataError(f"{path}: cannot read {field_name} (corrupt or truncated?): {err}") from err


def _image_to_array(im) -> np.ndarray:
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
    im = _pil_open(ref.image_path, "image")
    mk = _pil_open(ref.label_path, "mask")
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
    image = _as_image(_image_to_array(im), label.shape, ref.image_path, "image", channels_last=False)
    return Case(ref.case_id, ref.patient_id, image, label, (1.0, 1.0), None, ref.image_path)


_LOADERS = {"hdf5": _load_hdf5, "nifti": _load_nifti, "image": _load_image}


def load_case(ref: CaseRef) -> Case:
    """Read the arrays of one case. Raises DataError (file and field named) on any bad input."""
    if isinstance(ref, Case):
        return ref
    try:
        loader = _LOADERS[ref.kind]
    except KeyError:
        raise DataError(f"unknown case kind {ref.kind!r} for {ref.image_path}") from None
    if not Path(ref.image_path).is_file():
        raise DataError(f"image file not found: {ref.image_path}")
    return loader(ref)


def probe_case(ref: CaseRef) -> tuple[int, tuple[int, ...]]:
    """Return ``(in_channels, spatial_shape)`` from file headers only (no voxel data read).

    Raises DataError for a missing/unreadable file or a missing key.
    """
    if isinstance(ref, Case):
        return ref.in_channels, tuple(ref.label.shape)
    path = ref.image_path
    if not Path(path).is_file():
        raise DataError(f"image file not found: {path}")
    if ref.kind == "hdf5":
        import h5py

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
        ishape = tuple(_nib_load(path).shape)
        lab = _nib_load(ref.label_path)
        lshape = tuple(lab.shape)
        channels = ishape[-1] if len(ishape) == len(lshape) + 1 else 1
        if len(lshape) == 3:
            lshape = _reoriented_shape(lshape, lab.affine)
        return int(channels), lshape
    if ref.kind == "image":
        from PIL import Image

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
        img = _nib_load(ref.image_path)
        if len(shape) == 3:
            affine = reorient(np.zeros((1, 1, 1)), np.asarray(img.affine, dtype=np.float64))[1]
            return tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        zooms = tuple(float(z) for z in img.header.get_zooms()[: len(shape)])
        return zooms + (1.0,) * (len(shape) - len(zooms))
    if ref.kind == "hdf5":
        import h5py

        with h5py.File(ref.image_path, "r") as f:
            file_spacing = f[ref.image_key].attrs.get("spacing", f.attrs.get("spacing"))
        return _hdf5_spacing(ref, len(shape), file_spacing)
    return (1.0,) * len(shape)


def _finish(refs: list[CaseRef], root: Path, lazy: bool) -> list[CaseRef] | list[Case]:
    if not refs:
        raise DataError(f"no cases found in {root}")
    refs.sort(key=lambda r: r.case_id)
    _check_unique(refs, root)
    return refs if lazy else [load_case(r) for r in refs]


# --------------------------------------------------------------------------------------------
# readers


def read_hdf5_folder(
    root: str | Path,
    volumes_subdir: str | None = "volumes",
    image_key: str = "image",
    label_key: str = "label",
    patient_rule: PatientRule = None,
    num_classes: int | None = None,
    lazy: bool = True,
    spacing: float | Sequence[float] | None = None,
) -> list[CaseRef] | list[Case]:
    """Scan ``root/volumes_subdir/*.h5`` (also ``*.hdf5``); one case per file.

    Each file holds ``image_key`` (``[*spatial]`` or ``[C, *spatial]``) and ``label_key``
    (``[*spatial]``, integer). ``case_id`` is the file stem; ``patient_id`` comes from
    ``patient_rule`` (default: text before the first ``_frame``, else the stem, so ACDC's
    ``patient001_frame01`` -> ``patient001``; a regex string takes its group 1).

    Spacing (voxel size per spatial axis, in the file's axis order; used for resampling and HD95 in
    mm): ``spacing`` if given (one number or one per axis, for every file), else a ``spacing``
    attribute of the image dataset or of the file, else 1.0 mm per axis (HDF5 has no standard
    header, so HD95 of such data is in voxels unless the spacing is given).

    Returns CaseRefs (``lazy=True``) or loaded Cases. Raises DataError for a missing folder, no
    ``.h5`` files, and (on load) unreadable files, missing keys, bad shapes or labels.
    """
    root = Path(root)
    folder = _require_dir(root / volumes_subdir if volumes_subdir else root, "HDF5 volumes")
    rule = _patient_fn(patient_rule)
    try:
        meta = () if spacing is None else (("spacing", tuple(np.asarray(spacing, dtype=float).reshape(-1).tolist())),)
    except (TypeError, ValueError):
        raise DataError(f"{root}: reader spacing must be a number or a list of numbers, got {spacing!r}") from None
    refs = [
        CaseRef(_stem(p), rule(_stem(p)), str(p), str(p), "hdf5", image_key, label_key, num_classes, meta=meta)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in (".h5", ".hdf5")
    ]
    return _finish(refs, folder, lazy)


def read_msd_folder(
    root: str | Path,
    num_classes: int | None = None,
    patient_rule: PatientRule | Callable[[str], str] = None,
    lazy: bool = True,
) -> list[CaseRef] | list[Case]:
    """Read a Medical Segmentation Decathlon folder through its ``dataset.json``.

    Uses ``training: [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]``
    (paths relative to ``root``). ``num_classes`` defaults to ``len(labels)``. Loaded 3D cases are
    reoriented to ``SPL`` (:data:`CANONICAL_ORIENTATION`, :func:`reorient`; the file's codes kept in
    ``Case.orientation``), with
    the affine and spacing (from the header, in mm) following the arrays; a 4D image
    ``(X, Y, Z, C)`` becomes ``[C, X, Y, Z]``. ``patient_rule`` defaults to the case id itself (``_frame`` rule applied).

    Raises DataError for a missing folder or ``dataset.json``, bad JSON, a missing ``training``
    entry or field, a missing NIfTI file, and (on load) any bad volume.
    """
    root = _require_dir(Path(root), "MSD")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"MSD file not found: {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path}: cannot parse JSON: {err}") from err
    if not isinstance(meta, dict) or "training" not in meta:
        raise DataError(f"{meta_path}: missing field 'training'")
    training = meta["training"]
    if not isinstance(training, list):
        raise DataError(f"{meta_path}: field 'training' must be a list")
    labels = meta.get("labels")
    if num_classes is None and isinstance(labels, Mapping) and labels:
        num_classes = len(labels)
    n_modalities = len(meta["modality"]) if isinstance(meta.get("modality"), Mapping) else None
    rule = _patient_fn(patient_rule)
    refs = []
    for i, entry in enumerate(training):
        if not isinstance(entry, Mapping):
            raise DataError(f"{meta_path}: field 'training[{i}]' must be an object")
        for key in ("image", "label"):
            if key not in entry:
                raise DataError(f"{meta_path}: missing field 'training[{i}].{key}'")
        img, lab = root / entry["image"], root / entry["label"]
        for p, key in ((img, "image"), (lab, "label")):
            if not p.is_file():
                raise DataError(f"{meta_path}: 'training[{i}].{key}' file not found: {p}")
        cid = _stem(img)
        refs.append(CaseRef(cid, rule(cid), str(img), str(lab), "nifti", num_classes=num_classes,
                            meta=(("n_modalities", n_modalities),)))
    return _finish(refs, meta_path, lazy)


RARE_LABEL_SHARE = 1e-3  # a mask value on fewer pixels than this share of all is warned about


def scan_label_values(mask_paths: Sequence[str | Path]) -> tuple[int, ...]:
    """Sorted unique raw values over all masks (the default class mapping for 2D masks).

    A value on fewer than :data:`RARE_LABEL_SHARE` of all mask pixels (a stray value, e.g. from a
    lossy or resized mask, would make a binary task 3-class) is warned about, naming its masks."""
    counts: dict[int, int] = {}
    where: dict[int, list[str]] = {}
    for p in mask_paths:
        values, n = np.unique(_mask_to_array(_pil_open(str(p), "mask"), str(p)), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
            where.setdefault(v, []).append(str(p))
    total = sum(counts.values())
    for v in sorted(counts):
        if len(counts) > 2 and counts[v] < RARE_LABEL_SHARE * total:
            files = ", ".join(where[v][:3]) + (f" and {len(where[v]) - 3} more" if len(where[v]) > 3 else "")
            log.warning("mask value %d is on only %d of %d pixels (%s), yet makes its own class (%d classes from "
                        "values %s); if it is stray (a lossy or resized mask?), fix those masks", v, counts[v], total,
                        files, len(counts), sorted(counts))
    return tuple(sorted(counts))


def _mask_name_fn(rule: str | Sequence[str]) -> Callable[[str], str]:
    """``reader.mask_rule`` (a format string of ``{stem}`` or ``[regex, replacement]``) as stem -> mask name.

    Raises:
        ConfigError: anything else, an unknown ``{field}`` or a bad regex (names ``reader.mask_rule``).
    """
    if isinstance(rule, str):
        try:
            rule.format(stem="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"reader.mask_rule: {rule!r} may use only {{stem}} ({err!r}); for other names give "
                              "[regex, replacement], e.g. ['_training$', '_manual1']") from err
        return lambda stem: rule.format(stem=stem)
    if isinstance(rule, Sequence) and len(rule) == 2 and all(isinstance(r, str) for r in rule):
        def name(stem: str) -> str:
            try:
                return re.sub(rule[0], rule[1], stem)
            except re.error as err:
                raise ConfigError(f"reader.mask_rule: {list(rule)} is not a valid [regex, replacement]: {err}") from err

        return name
    raise ConfigError(f"reader.mask_rule: give a format string of {{stem}} or [regex, replacement], got {rule!r}")


def read_image_mask_folder(
    root: str | Path,
    images: str = "images",
    masks: str = "masks",
    mask_rule: str | Sequence[str] = "{stem}_mask",
    exts: Sequence[str] = (".png", ".tif", ".tiff", ".gif", ".jpg"),
    label_values: Sequence[int] | Mapping[int, int] | None = None,
    num_classes: int | None = None,
    patient_rule: PatientRule = None,
    lazy: bool = True,
) -> list[CaseRef] | list[Case]:
    """Scan a folder of 2D images (``root/images``) and masks (``root/masks``).

    The mask of ``images/<stem>.<ext>`` is ``masks/<name>.<ext2>`` with any extension in ``exts``;
    ``name`` is ``mask_rule.format(stem=stem)``, or for ``mask_rule = [regex, replacement]``
    ``re.sub(regex, replacement, stem)`` (DRIVE's ``21_training`` -> ``21_manual1``:
    ``["_training$", "_manual1"]``). Images load as float32 ``[1, H, W]`` (grayscale) or ``[3, H, W]`` (RGB,
    RGBA, palette); intensities are kept raw.

    Mask values map to classes: ``label_values`` as a sequence lists raw values in class order
    (``label_values[k]`` -> class ``k``), as a dict maps raw value -> class (ordered by class);
    by default the sorted unique values over *all* masks of the data set map to ``0 .. K-1``
    (so 0/255 masks -> 0/1). The default scan reads every mask once (2D masks are small).

    Raises DataError for missing folders, no images, an image without a mask, unreadable files,
    (on load) a mask value outside the mapping, size mismatch, or more values than ``num_classes``;
    ConfigError for a ``mask_rule`` that is neither (names ``reader.mask_rule``).
    """
    mask_name = _mask_name_fn(mask_rule)
    root = Path(root)
    img_dir = _require_dir(root / images, "images")
    mask_dir = _require_dir(root / masks, "masks")
    exts = tuple(e.lower() for e in exts)
    mask_index: dict[str, Path] = {}
    for p in sorted(mask_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in exts:
            mask_index.setdefault(p.stem, p)
    rule = _patient_fn(patient_rule)
    pairs = []
    for p in sorted(img_dir.iterdir()):
        if not (p.is_file() and p.suffix.lower() in exts):
            continue
        want = mask_name(p.stem)
        if want not in mask_index:
            raise DataError(f"{p}: no mask named {want!r} with extension in {exts} in {mask_dir}")
        pairs.append((p, mask_index[want]))
    if not pairs:
        raise DataError(f"no images with extensions {exts} found in {img_dir}")
    if label_values is None:
        values = scan_label_values([m for _, m in pairs])
    elif isinstance(label_values, Mapping):
        order = sorted(label_values.items(), key=lambda kv: kv[1])
        if [k for _, k in order] != list(range(len(order))):
            raise DataError(f"label_values must map raw values onto 0..K-1, got {dict(label_values)}")
        values = tuple(int(v) for v, _ in order)
    else:
        values = tuple(int(v) for v in label_values)
    if len(set(values)) != len(values):
        raise DataError(f"label_values has repeated values: {list(values)}")
    if num_classes is not None and len(values) > num_classes:
        raise DataError(
            f"{mask_dir}: masks hold {len(values)} distinct values {list(values)} > num_classes={num_classes}"
        )
    refs = [
        CaseRef(p.stem, rule(p.stem), str(p), str(m), "image", num_classes=num_classes or len(values),
                label_values=values)
        for p, m in pairs
    ]
    return _finish(refs, img_dir, lazy)


def load_label(ref: CaseRef) -> np.ndarray:
    """Read and validate only the label of a case (int64 ``[*spatial]``); HDF5 skips the image."""
    if isinstance(ref, Case):
        return ref.label
    if ref.kind != "hdf5":
        return load_case(ref).label
    import h5py

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
