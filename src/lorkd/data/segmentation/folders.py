"""Finding the cases of a data set in its folder: HDF5 volume folders, MSD (NIfTI) data sets, 2D
image/mask folders.

Every reader scans a folder and returns one record per case. By default (``lazy=True``) the records
are :class:`~lorkd.data.segmentation.cases.CaseRef` (ids and paths only, cheap to scan, hashable);
:func:`~lorkd.data.segmentation.formats.load_case` turns a ref into a
:class:`~lorkd.data.segmentation.cases.Case` holding the arrays. ``lazy=False`` loads (and so fully
validates) every case at once.

Errors: a missing folder or file, no cases, or a bad ``dataset.json`` raise
:class:`lorkd.errors.DataError` naming the file and field (and so does any bad case on load).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lorkd.errors import ConfigError, DataError
from lorkd.fileio import read_json

from .cases import Case, CaseRef
from .formats import _mask_to_array, load_case, pil_open

log = logging.getLogger("lorkd")

__all__ = [
    "default_patient_rule",
    "patient_folder_rule",
    "read_hdf5_folder",
    "read_msd_folder",
    "read_image_mask_folder",
    "scan_label_values",
    "warn_rare_label_values",
]


PatientRule = Callable[[str], str] | str | None


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
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".h5", ".hdf5"):
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


def _finish(refs: list[CaseRef], root: Path, lazy: bool) -> list[CaseRef] | list[Case]:
    if not refs:
        raise DataError(f"no cases found in {root}")
    refs.sort(key=lambda r: r.case_id)
    _check_unique(refs, root)
    return refs if lazy else [load_case(r) for r in refs]


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
    (paths relative to ``root``); an image or label may also be an NRRD file (``.nrrd``, ``.nhdr``) or a
    folder holding one DICOM series (see :mod:`.volume_files`; ``pip install lorkd[volumes]``). ``num_classes`` defaults to ``len(labels)``. Loaded 3D cases are
    reoriented to ``SPL`` (:data:`CANONICAL_ORIENTATION`, :func:`reorient`; the file's codes kept in
    ``Case.orientation``), with
    the affine and spacing (from the header or the DICOM tags, in mm) following the arrays; a 4D image
    ``(X, Y, Z, C)`` becomes ``[C, X, Y, Z]``. ``patient_rule`` defaults to the case id itself (``_frame`` rule applied).

    Raises DataError for a missing folder or ``dataset.json``, bad JSON, a missing ``training``
    entry or field, a missing NIfTI file, and (on load) any bad volume.
    """
    root = _require_dir(Path(root), "MSD")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"MSD file not found: {meta_path}")
    meta = read_json(meta_path)  # DataError naming the file: unreadable, not JSON, not an object
    if "training" not in meta:
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
            if not (p.is_file() or p.is_dir()):  # a folder: a DICOM series
                raise DataError(f"{meta_path}: 'training[{i}].{key}' file not found: {p}")
        cid = _stem(img)
        refs.append(CaseRef(cid, rule(cid), str(img), str(lab), "nifti", num_classes=num_classes,
                            meta=(("n_modalities", n_modalities),)))
    return _finish(refs, meta_path, lazy)


RARE_LABEL_SHARE = 1e-3  # a mask value on fewer pixels than this share of all is warned about
RARE_MASK_SHARE = 0.05  # ... and one in at most this share of the masks (at least 1 mask) too


def scan_label_values(mask_paths: Sequence[str | Path]) -> tuple[int, ...]:
    """Sorted unique raw values over all masks (the default class mapping for 2D masks); rare
    values are warned about (:func:`warn_rare_label_values`)."""
    counts: dict[int, int] = {}
    where: dict[int, list[str]] = {}
    for p in mask_paths:
        values, n = np.unique(_mask_to_array(pil_open(str(p), "mask"), str(p)), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
            where.setdefault(v, []).append(str(p))
    warn_rare_label_values(counts, where, len(mask_paths))
    return tuple(sorted(counts))


def warn_rare_label_values(counts: Mapping[int, int], where: Mapping[int, Sequence[str]], n_masks: int) -> list[int]:
    """Warn about each mask value that looks stray yet would make its own class, naming its masks.

    A value is rare when it is on fewer than :data:`RARE_LABEL_SHARE` of all mask pixels, or (with 3
    masks or more) in at most ``max(1, RARE_MASK_SHARE * n_masks)`` of the masks (a block of a stray
    value in one mask; one mask's foreground stored as 128 where the others use 255). Only data sets
    with more than two values are checked (a binary task has nothing to confuse).

    Args:
        counts: value -> number of pixels/voxels over all masks.
        where: value -> the mask files holding it.
        n_masks: number of masks scanned.

    Returns:
        The rare values, sorted (each logged once as a warning).
    """
    total = sum(counts.values())
    few = max(1, int(RARE_MASK_SHARE * n_masks))
    rare = []
    for v in sorted(counts):
        in_few = n_masks >= 3 and len(where[v]) <= few
        if len(counts) <= 2 or not (counts[v] < RARE_LABEL_SHARE * total or in_few):
            continue
        rare.append(v)
        files = ", ".join(where[v][:3]) + (f" and {len(where[v]) - 3} more" if len(where[v]) > 3 else "")
        n_in = len(where[v])
        seen = (f"is on only {counts[v]} of {total} pixels ({files}), in {n_in} of {n_masks} masks"
                if counts[v] < RARE_LABEL_SHARE * total else
                f"is in only {n_in} of {n_masks} masks ({files}), on {counts[v]} of {total} pixels")
        log.warning("mask value %d %s, yet makes its own class (%d classes from values %s); if it is stray (a lossy "
                    "or resized mask, another value for the same structure?), fix those masks or list the values "
                    "to use (reader.label_values)", v, seen, len(counts), sorted(counts))
    return rare


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
    recursive: bool = False,
) -> list[CaseRef] | list[Case]:
    """Scan a folder of 2D images (``root/images``) and masks (``root/masks``).

    With ``recursive``, images in subfolders are found too (``images/patient7/slice03.png``, one
    folder per patient), each with its mask in the same subfolder of ``masks``
    (``masks/patient7/slice03_mask.png``); the case id is the path below ``images`` without the
    extension (``patient7/slice03``), so equal file names in different folders stay distinct cases.
    ``patient_rule`` then sees that id (a regex may use the folder, e.g. ``'^(\\w+)/'``); by default the
    patient is the first folder (:func:`patient_folder_rule`), so a patient's images stay in one split.

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
    mask_index: dict[tuple[Path, str], Path] = {}
    for p in _files(mask_dir, exts, recursive):
        mask_index.setdefault((p.parent.relative_to(mask_dir), p.stem), p)
    rule = _patient_fn(patient_rule if patient_rule is not None or not recursive else patient_folder_rule)
    pairs = []
    for p in _files(img_dir, exts, recursive):
        sub, want = p.parent.relative_to(img_dir), mask_name(p.stem)
        if (sub, want) not in mask_index:
            raise DataError(f"{p}: no mask named {want!r} with extension in {exts} in {mask_dir / sub}")
        pairs.append((p, mask_index[sub, want]))
    if not pairs:
        raise DataError(f"no images with extensions {exts} found in {img_dir}" + (" or its subfolders" if recursive else ""))
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
        raise DataError(f"masks hold {len(values)} distinct values {list(values)} > num_classes={num_classes}"
                        + _files_holding(values, [m for _, m in pairs], len(values) - num_classes))
    ids = [p.relative_to(img_dir).with_suffix("").as_posix() for p, _ in pairs]
    refs = [
        CaseRef(cid, rule(cid), str(p), str(m), "image", num_classes=num_classes or len(values),
                label_values=values)
        for cid, (p, m) in zip(ids, pairs)
    ]
    return _finish(refs, img_dir, lazy)


def _files_holding(values: Sequence[int], masks: Sequence[Path], extra: int, most: int = 3) -> str:
    """``"; value v in <file>, ..."`` for the ``extra`` values found in the fewest masks (the likely
    strays), naming up to ``most`` of their mask files."""
    where: dict[int, list[str]] = {v: [] for v in values}
    for m in masks:
        for v in np.unique(_mask_to_array(pil_open(str(m), "mask"), str(m))).tolist():
            where.setdefault(v, []).append(str(m))
    rare = sorted(values, key=lambda v: (len(where[v]), v))[:extra]
    return "".join(f"; value {v} in {len(where[v])} mask(s): {', '.join(where[v][:most])}" for v in rare)


def patient_folder_rule(case_id: str) -> str:
    """Patient id of a case found by a recursive scan: its first folder (``patient7/slice03`` ->
    ``patient7``); a case at the top level: :func:`default_patient_rule` of its id."""
    head, sep, _ = case_id.partition("/")
    return head if sep else default_patient_rule(case_id)


def _files(folder: Path, exts: Sequence[str], recursive: bool) -> list[Path]:
    """Files of ``folder`` (and its subfolders when ``recursive``) with a suffix in ``exts``, sorted;
    hidden files and folders are skipped."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in exts
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))
