"""Segmentation tasks: patient-wise splits, preprocessing, patch and whole-volume datasets.

One code path serves 2D and 3D: arrays are ``[C, *spatial]`` images and ``[*spatial]`` labels
whatever ``spatial_dims`` is.

Typical use::

    acdc = load_segmentation_task("acdc", "acdc_sslmis_h5", format="hdf5", num_classes=4, seed=0)
    la = load_segmentation_task("la", "la2018_h5", format="hdf5", num_classes=2, seed=0)
    acdc.save_split(out / "split_acdc.json")
    pre = Preprocess(normalize="zscore", scale=0.5)
    cache = VolumeCache()
    train = PatchDataset([acdc, la], patch_size=(16, 64, 64), preprocess=pre, cache=cache)
    test = VolumeDataset([acdc, la], split="test", preprocess=pre, cache=cache)
    DataLoader(test, batch_size=None)   # whole volumes, one at a time (meta holds None affines)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lorkd.data.augment import Augment
from lorkd.data.paths import shared_data_dir
from lorkd.data.volumes import (
    Case,
    CaseRef,
    load_case,
    load_label,
    probe_case,
    read_hdf5_folder,
    read_image_mask_folder,
    read_msd_folder,
)
from lorkd.errors import ConfigError, DataError

__all__ = [
    "split_cases",
    "save_split",
    "load_split",
    "apply_split",
    "SegmentationTaskData",
    "load_segmentation_task",
    "Preprocess",
    "normalize_intensity",
    "resample",
    "resize_case",
    "preprocess_case",
    "PreparedVolume",
    "VolumeCache",
    "PatchDataset",
    "VolumeDataset",
]

DEFAULT_SPLIT_NAMES = {2: ("train", "test"), 3: ("train", "val", "test")}


# --------------------------------------------------------------------------------------------
# splits


def _largest_remainder(fractions: Sequence[float], total: int) -> list[int]:
    exact = [f * total for f in fractions]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    # every split asked for (fraction > 0) gets at least one patient when there are enough
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def split_cases(
    items: Sequence[Any],
    fractions: Sequence[float] | Mapping[str, float] | None = (0.6, 0.2, 0.2),
    *,
    counts: Sequence[int | None] | Mapping[str, int | None] | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, list]:
    """Split cases (``Case``/``CaseRef``: anything with ``case_id`` and ``patient_id``) by patient.

    Patients (sorted by id, then shuffled with ``numpy.random.default_rng(seed)``) are dealt into
    splits by ``fractions`` (largest-remainder rounding; each split with a positive fraction gets at
    least one patient when there are enough) or by ``counts`` (patients per split; one ``None``
    entry takes the rest). Names default to ``train/test`` (2 splits) or ``train/val/test`` (3),
    or come from the keys of a mapping. The result maps name -> items sorted by ``case_id``; it
    depends only on the set of items and the seed, not on their order. No patient is in two splits.

    Raises ConfigError for bad fractions/counts/names.
    """
    if counts is not None:
        spec: Sequence = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
        keys = list(counts.keys()) if isinstance(counts, Mapping) else None
    elif fractions is not None:
        spec = list(fractions.values()) if isinstance(fractions, Mapping) else list(fractions)
        keys = list(fractions.keys()) if isinstance(fractions, Mapping) else None
    else:
        raise ConfigError("split_cases needs fractions or counts")
    if names is None:
        names = keys or DEFAULT_SPLIT_NAMES.get(len(spec))
        if names is None:
            raise ConfigError(f"split_cases: give names for {len(spec)} splits")
    names = list(names)
    if len(names) != len(spec) or len(set(names)) != len(names):
        raise ConfigError(f"split_cases: names {names} do not match {len(spec)} splits")
    patients = sorted({str(it.patient_id) for it in items})
    n = len(patients)
    if counts is not None:
        if sum(c is None for c in spec) > 1:
            raise ConfigError(f"split_cases: at most one count may be None, got counts={spec}")
        if any(c is not None and (not isinstance(c, (int, np.integer)) or c < 0) for c in spec):
            raise ConfigError(f"split_cases: counts must be non-negative integers, got {spec}")
        fixed = sum(c for c in spec if c is not None)
        if fixed > n or (None not in spec and fixed != n):
            raise ConfigError(f"split_cases: counts {spec} do not add up to the {n} patients")
        sizes = [n - fixed if c is None else int(c) for c in spec]
    else:
        if any(not isinstance(f, (int, float)) or f < 0 or not math.isfinite(f) for f in spec):
            raise ConfigError(f"split_cases: fractions must be non-negative numbers, got {spec}")
        if abs(sum(spec) - 1.0) > 1e-6:
            raise ConfigError(f"split_cases: fractions {spec} must add up to 1")
        sizes = _largest_remainder(spec, n)
    order = [patients[i] for i in np.random.default_rng(seed).permutation(n)]
    where: dict[str, str] = {}
    start = 0
    for name, size in zip(names, sizes):
        for p in order[start : start + size]:
            where[p] = name
        start += size
    out: dict[str, list] = {name: [] for name in names}
    for it in sorted(items, key=lambda it: str(it.case_id)):
        out[where[str(it.patient_id)]].append(it)
    return out


def save_split(split: Mapping[str, Sequence[Any]], path: str | Path) -> Path:
    """Write a split as JSON ``{name: [case_id, ...]}`` (items or plain id strings); returns the path."""
    path = Path(path)
    data = {name: [x if isinstance(x, str) else str(x.case_id) for x in items]
            for name, items in split.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load_split(path: str | Path) -> dict[str, list[str]]:
    """Read a split written by :func:`save_split`. Raises DataError for a missing/bad file or a
    case id listed in two splits."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot parse split JSON: {err}") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: a split must be a JSON object of name -> list of case ids")
    seen: dict[str, str] = {}
    for name, ids in data.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{path}: field {name!r} must be a list of case id strings")
        for i in ids:
            if i in seen:
                raise DataError(f"{path}: case {i!r} is in both {seen[i]!r} and {name!r}")
            seen[i] = name
    return data


def apply_split(items: Sequence[Any], split_ids: Mapping[str, Sequence[str]]) -> dict[str, list]:
    """Map a ``{name: [case_id]}`` split back onto items. Raises DataError for an unknown case id."""
    by_id = {str(it.case_id): it for it in items}
    out = {}
    for name, ids in split_ids.items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"split {name!r} lists unknown case id(s) {missing[:5]}")
        out[name] = [by_id[i] for i in ids]
    return out


# --------------------------------------------------------------------------------------------
# tasks


@dataclass
class SegmentationTaskData:
    """One segmentation task: its shape facts and its case refs by split.

    ``in_channels`` and ``spatial_dims`` describe loaded images ``[in_channels, *spatial]``;
    labels are ``0 .. num_classes-1``. Split entries are usually :class:`CaseRef`; in-memory
    :class:`Case` objects work too (e.g. synthetic data); both can key the volume cache.
    """

    name: str
    num_classes: int
    in_channels: int
    spatial_dims: int
    splits: dict[str, list[CaseRef | Case]]
    root: str = ""

    def cases(self, split: str) -> list[CaseRef]:
        """Refs of one split. Raises ConfigError for an unknown split name."""
        if split not in self.splits:
            raise ConfigError(f"task {self.name!r} has no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def split_ids(self) -> dict[str, list[str]]:
        return {name: [r.case_id for r in refs] for name, refs in self.splits.items()}

    def save_split(self, path: str | Path) -> Path:
        """Write the split (case ids per split) as JSON, e.g. into the run's output folder."""
        return save_split(self.splits, path)


_READERS = {"hdf5": read_hdf5_folder, "msd": read_msd_folder, "folder": read_image_mask_folder}


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (shared_data_dir() / p).exists():
        return shared_data_dir() / p
    return p


def load_segmentation_task(
    name: str,
    path: str | Path,
    format: str = "hdf5",
    num_classes: int | None = None,
    split: Any = None,
    seed: int = 0,
    **reader_kwargs: Any,
) -> SegmentationTaskData:
    """Scan a data set and split it by patient.

    Args:
        name: task name.
        path: data folder; a relative path that does not exist is looked up under
            :func:`lorkd.data.paths.shared_data_dir` (so ``"acdc_sslmis_h5"`` works).
        format: ``"hdf5"`` (:func:`read_hdf5_folder`), ``"msd"`` (:func:`read_msd_folder`) or
            ``"folder"`` (:func:`read_image_mask_folder`); ``reader_kwargs`` go to the reader.
        num_classes: classes incl. background; labels above it raise DataError on load. ``None``:
            taken from the reader (MSD ``labels``, mask values) or, for HDF5, from a scan of every
            label (max + 1, at least 2) -- pass it to skip that scan.
        split: ``None`` -> fractions (0.6, 0.2, 0.2); a sequence of floats (fractions) or of ints
            (patient counts); a mapping name -> fraction; a mapping name -> list of case ids; or the
            path of a JSON file written by :func:`save_split`.
        seed: seed of the patient shuffle.

    Raises ConfigError for an unknown format or bad split spec; DataError for bad data (including
    cases whose channel counts or spatial dims disagree).
    """
    if format not in _READERS:
        raise ConfigError(f"task {name!r}: unknown format {format!r} (use one of {sorted(_READERS)})")
    root = _resolve(path)
    refs = list(_READERS[format](root, num_classes=num_classes, lazy=True, **reader_kwargs))
    probes = {r.case_id: probe_case(r) for r in refs}
    chans = {c for c, _ in probes.values()}
    dims = {len(s) for _, s in probes.values()}
    if len(chans) != 1:
        raise DataError(f"task {name!r} in {root}: cases disagree on channel count {sorted(chans)}")
    if len(dims) != 1:
        raise DataError(f"task {name!r} in {root}: cases disagree on spatial dims {sorted(dims)}")
    if num_classes is None:
        num_classes = refs[0].num_classes
        if num_classes is None:
            num_classes = max(2, max(int(load_label(r).max()) + 1 for r in refs))
    refs = [r.with_num_classes(num_classes) for r in refs]
    if split is None:
        split = (0.6, 0.2, 0.2)
    if isinstance(split, (str, Path)):
        splits = apply_split(refs, load_split(split))
    elif isinstance(split, Mapping) and all(not isinstance(v, (int, float)) for v in split.values()):
        splits = apply_split(refs, {k: list(v) for k, v in split.items()})
    elif isinstance(split, (Mapping, Sequence)) and len(split) > 0:
        values = list(split.values()) if isinstance(split, Mapping) else list(split)
        # integers (one may be None = the rest) adding up to more than 1 are patient counts;
        # anything else is fractions
        ints = [v for v in values if v is not None]
        is_counts = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ints) \
            and (len(ints) < len(values) or sum(ints) > 1)
        if is_counts:
            splits = split_cases(refs, counts=split, seed=seed)
        elif isinstance(split, Mapping):
            splits = split_cases(refs, split, seed=seed)
        else:
            splits = split_cases(refs, tuple(values), seed=seed)
    else:
        raise ConfigError(f"task {name!r}: cannot use split={split!r}")
    return SegmentationTaskData(name, int(num_classes), chans.pop(), dims.pop(), splits, str(root))


# --------------------------------------------------------------------------------------------
# preprocessing


NORMALIZE_MODES = ("zscore", "zscore_nonzero", "minmax", "none")


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


# --------------------------------------------------------------------------------------------
# cache


@dataclass
class PreparedVolume:
    """A preprocessed case held in memory: image float32 ``[C, *spatial]``, label in the smallest
    unsigned dtype (int64 on output), meta, and (lazily) foreground voxel indices per class."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    meta: dict[str, Any]
    _fg: dict[int, np.ndarray] | None = field(default=None, repr=False)

    def foreground(self) -> dict[int, np.ndarray]:
        """Flat indices of the voxels of each present class > 0 (computed once)."""
        if self._fg is None:
            flat = self.label.reshape(-1)
            self._fg = {}
            for k in np.unique(flat):
                if k > 0:
                    self._fg[int(k)] = np.flatnonzero(flat == k)
        return self._fg


class VolumeCache:
    """In-memory cache of preprocessed volumes keyed by ``(CaseRef, Preprocess)``.

    Files are read (via :func:`load_case`) once per key; ``loads`` counts the reads. Share one cache
    between a :class:`PatchDataset` and a :class:`VolumeDataset`. With ``DataLoader`` workers each
    worker holds its own copy unless the cache is filled (``dataset.warm()``) before the workers fork.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[CaseRef, Preprocess], PreparedVolume] = {}
        self._original: dict[CaseRef, np.ndarray] = {}
        self.loads = 0

    def __len__(self) -> int:
        return len(self._store)

    def get(self, ref: CaseRef, pre: Preprocess) -> PreparedVolume:
        key = (ref, pre)
        vol = self._store.get(key)
        if vol is None:
            case, meta = preprocess_case(load_case(ref), pre)
            self.loads += 1
            hi = int(case.label.max()) if case.label.size else 0
            dtype = np.uint8 if hi < 256 else (np.uint16 if hi < 65536 else np.int64)
            vol = PreparedVolume(case.case_id, case.image, case.label.astype(dtype), meta)
            self._store[key] = vol
        return vol

    def original_label(self, ref: CaseRef) -> np.ndarray:
        """The label of ``ref`` on its original grid (as read, before any resampling), int64
        ``[*original_shape]``; read once (HDF5: the label only) and kept as the smallest dtype."""
        lab = self._original.get(ref)
        if lab is None:
            lab = load_label(ref)
            hi = int(lab.max()) if lab.size else 0
            lab = lab.astype(np.uint8 if hi < 256 else (np.uint16 if hi < 65536 else np.int64))
            self._original[ref] = lab
        return lab.astype(np.int64)

    def clear(self) -> None:
        self._store.clear()
        self._original.clear()


# --------------------------------------------------------------------------------------------
# datasets


def _per_task(value: Any, tasks: Sequence[SegmentationTaskData], what: str) -> list:
    if isinstance(value, Mapping):
        missing = [t.name for t in tasks if t.name not in value]
        if missing:
            raise ConfigError(f"{what}: no entry for task(s) {missing}")
        return [value[t.name] for t in tasks]
    if isinstance(value, (list, tuple)) and not isinstance(value, Preprocess):
        if len(value) != len(tasks):
            raise ConfigError(f"{what}: {len(value)} entries for {len(tasks)} tasks")
        return list(value)
    return [value] * len(tasks)


def _fit_channels(image: np.ndarray, channels: int, fill: str) -> np.ndarray:
    c = image.shape[0]
    if c == channels:
        return image
    if fill == "repeat":
        return image[np.arange(channels) % c]
    pad = np.zeros((channels - c,) + image.shape[1:], dtype=image.dtype)
    return np.concatenate([image, pad], axis=0)


class _TaskSet:
    """Shared setup of the two datasets: tasks, preprocessing, channel fitting, cache."""

    def __init__(self, tasks, preprocess, in_channels, channel_fill, cache):
        if isinstance(tasks, SegmentationTaskData):
            tasks = [tasks]
        self.tasks = list(tasks)
        if not self.tasks:
            raise ConfigError("no tasks given")
        if channel_fill not in ("zeros", "repeat"):
            raise ConfigError(f"channel_fill={channel_fill!r}; use 'zeros' or 'repeat'")
        self.channel_fill = channel_fill
        need = max(t.in_channels for t in self.tasks)
        if in_channels is None:
            in_channels = need
        elif in_channels < need:
            raise ConfigError(f"in_channels={in_channels} < {need} channels of the widest task")
        self.in_channels = int(in_channels)
        self.preprocess = [p or Preprocess() for p in _per_task(preprocess, self.tasks, "preprocess")]
        self.cache = cache if cache is not None else VolumeCache()

    def volume(self, t: int, ref: CaseRef) -> PreparedVolume:
        return self.cache.get(ref, self.preprocess[t])


class PatchDataset(Dataset, _TaskSet):
    """Random training patches from several segmentation tasks.

    Item ``i`` is ``(image, label, task_id)``: float32 tensor ``[C, *patch_size]``, int64 tensor
    ``[*patch_size]``, int. ``C`` is ``in_channels`` (default: the most channels of any task); a
    task with fewer channels is filled with zero channels (``channel_fill="zeros"``) or its channels
    are repeated cyclically (``"repeat"``: a 1-channel image is copied into every channel).

    Sampling: the task is ``i % num_tasks`` (exact balance) or drawn with ``task_weights``; with
    ``task_blocks=True`` each task instead owns one contiguous block of indices (sizes in
    :attr:`task_sizes`: equal, or in proportion to ``task_weights``), the layout
    :class:`~lorkd.data.multitask.TaskBatchSampler` expects, which then mixes the tasks. The case
    is uniform within the task's split; with probability ``foreground_ratio`` the patch is centred
    on a foreground voxel (a class > 0 chosen uniformly among those present, then one of its
    voxels), else on a uniform random voxel. Patches are shifted to stay inside the volume; a
    volume smaller than the patch along an axis is centred and padded (image ``pad_value``,
    label 0). ``patch_size`` may have one entry fewer than a task's spatial dims: the task then
    yields 2D patches from a random slice along its first spatial axis (e.g. ACDC ``(Z, H, W)``
    volumes as 2D images).

    ``augment`` (an :class:`~lorkd.data.augment.Augment`, ``None``: none) transforms the patch's
    image and label together (flips, small rotation/zoom, intensity), with its own generator
    ``default_rng([seed, epoch, i, 1])``, so the patch location does not depend on it.

    Randomness comes from ``numpy.random.default_rng([seed, epoch, i])``: call ``set_epoch(e)``
    each epoch for new patches; the same ``(seed, epoch, i)`` always gives the same patch.
    ``samples_per_epoch`` is ``len(self)``. Volumes are preprocessed and cached on first use
    (:class:`VolumeCache`), so later epochs never re-read files.

    Raises ConfigError for a bad patch size, split or channel setting.
    """

    def __init__(
        self,
        tasks: SegmentationTaskData | Sequence[SegmentationTaskData],
        patch_size: Sequence[int],
        split: str = "train",
        samples_per_epoch: int = 1000,
        foreground_ratio: float = 0.5,
        preprocess: Preprocess | Sequence[Preprocess] | Mapping[str, Preprocess] | None = None,
        in_channels: int | None = None,
        channel_fill: str = "zeros",
        task_weights: Sequence[float] | None = None,
        pad_value: float = 0.0,
        seed: int = 0,
        cache: VolumeCache | None = None,
        task_blocks: bool = False,
        augment: Augment | None = None,
    ) -> None:
        _TaskSet.__init__(self, tasks, preprocess, in_channels, channel_fill, cache)
        self.augment = augment
        self.task_blocks = bool(task_blocks)
        self.patch_size = tuple(int(p) for p in patch_size)
        if not self.patch_size or any(p < 1 for p in self.patch_size):
            raise ConfigError(f"patch_size={tuple(patch_size)} must be positive integers")
        self.slice_mode = []
        for t in self.tasks:
            if t.spatial_dims == len(self.patch_size):
                self.slice_mode.append(False)
            elif t.spatial_dims == len(self.patch_size) + 1:
                self.slice_mode.append(True)
            else:
                raise ConfigError(
                    f"patch_size={self.patch_size} does not fit task {t.name!r} "
                    f"with spatial_dims={t.spatial_dims}"
                )
        self.refs = [t.cases(split) for t in self.tasks]
        empty = [t.name for t, r in zip(self.tasks, self.refs) if not r]
        if empty:
            raise ConfigError(f"split {split!r} is empty for task(s) {empty}")
        if samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch={samples_per_epoch} must be >= 1")
        if not 0.0 <= foreground_ratio <= 1.0:
            raise ConfigError(f"foreground_ratio={foreground_ratio} must lie in [0, 1]")
        if task_weights is not None:
            w = np.asarray(task_weights, dtype=np.float64)
            if w.shape != (len(self.tasks),) or (w < 0).any() or w.sum() <= 0:
                raise ConfigError(
                    f"task_weights={list(task_weights)} must be {len(self.tasks)} non-negative numbers"
                )
            task_weights = w / w.sum()
        self.task_weights = task_weights
        self.samples_per_epoch = int(samples_per_epoch)
        self.foreground_ratio = float(foreground_ratio)
        self.pad_value = float(pad_value)
        self.seed = int(seed)
        self.epoch = 0
        self._offsets = None
        if self.task_blocks:
            share = task_weights if task_weights is not None else [1.0 / len(self.tasks)] * len(self.tasks)
            sizes = _largest_remainder(list(share), self.samples_per_epoch)
            if min(sizes) < 1:
                raise ConfigError(f"samples_per_epoch={samples_per_epoch} leaves a task without samples "
                                  f"(blocks {sizes}); raise it")
            self._offsets = np.cumsum([0] + sizes).tolist()

    @property
    def task_sizes(self) -> list[int]:
        """Samples of each task per epoch (``task_blocks=True`` only; else raises AttributeError)."""
        if self._offsets is None:
            raise AttributeError("task_sizes needs task_blocks=True (tasks are interleaved otherwise)")
        return [b - a for a, b in zip(self._offsets[:-1], self._offsets[1:])]

    def task_of(self, i: int) -> int:
        """The task of index ``i`` (without drawing a patch; ``task_weights`` without blocks: -1)."""
        if self._offsets is not None:
            return int(np.searchsorted(self._offsets, i, side="right") - 1)
        return int(i % len(self.tasks)) if self.task_weights is None else -1

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def warm(self) -> None:
        """Load and preprocess every volume now (before DataLoader workers fork)."""
        for t, refs in enumerate(self.refs):
            for r in refs:
                self.volume(t, r)

    def _crop(self, arr: np.ndarray, starts: Sequence[int], size: Sequence[int], value: float) -> np.ndarray:
        """Crop ``arr[..., *spatial]`` at ``starts`` (may be negative / run past the end) with padding."""
        lead = arr.ndim - len(size)
        spatial = arr.shape[lead:]
        sl, pads = [slice(None)] * lead, [(0, 0)] * lead
        for s, p, n in zip(starts, size, spatial):
            lo, hi = max(s, 0), min(s + p, n)
            sl.append(slice(lo, hi))
            pads.append((lo - s, s + p - hi))
        out = arr[tuple(sl)]
        if any(a or b for a, b in pads):
            out = np.pad(out, pads, mode="constant", constant_values=value)
        return out

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        if self._offsets is not None:
            t = self.task_of(i)
        elif self.task_weights is None:
            t = int(i % len(self.tasks))
        else:
            t = int(rng.choice(len(self.tasks), p=self.task_weights))
        refs = self.refs[t]
        vol = self.volume(t, refs[int(rng.integers(len(refs)))])
        shape = vol.label.shape
        size = ((1,) if self.slice_mode[t] else ()) + self.patch_size
        fg = vol.foreground() if rng.random() < self.foreground_ratio else {}
        if fg:
            classes = sorted(fg)
            idx = fg[classes[int(rng.integers(len(classes)))]]
            centre = np.unravel_index(int(idx[int(rng.integers(len(idx)))]), shape)
        else:
            centre = [int(rng.integers(n)) for n in shape]
        starts = []
        for c, p, n in zip(centre, size, shape):
            if n >= p:
                starts.append(int(min(max(int(c) - p // 2, 0), n - p)))
            else:
                starts.append(-((p - n) // 2))
        image = self._crop(vol.image, starts, size, self.pad_value)
        label = self._crop(vol.label, starts, size, 0)
        if self.slice_mode[t]:
            image, label = image[:, 0], label[0]
        if self.augment is not None:  # its own stream: the patch drawn does not depend on augmentation
            image, label = self.augment(image, label, np.random.default_rng([self.seed, self.epoch, int(i), 1]))
        image = _fit_channels(image, self.in_channels, self.channel_fill)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy(label.astype(np.int64)), t)


class VolumeDataset(Dataset, _TaskSet):
    """Whole preprocessed volumes for evaluation, one case per item, tasks in order.

    Item: ``(image, label, task_id, case_id, meta)``: float32 tensor ``[C, *spatial]`` (channels
    fitted as in :class:`PatchDataset`), int64 tensor ``[*spatial]`` (preprocessed grid), int, str,
    and ``meta`` = ``{"task", "spacing", "affine" (4x4 or None), "original_shape",
    "original_spacing", "source", "patient_id"}``. Iterate with ``DataLoader(ds, batch_size=None)``
    (volumes differ in shape and ``affine`` may be None). Volumes are cached like PatchDataset's.
    """

    def __init__(
        self,
        tasks: SegmentationTaskData | Sequence[SegmentationTaskData],
        split: str = "test",
        preprocess: Preprocess | Sequence[Preprocess] | Mapping[str, Preprocess] | None = None,
        in_channels: int | None = None,
        channel_fill: str = "zeros",
        cache: VolumeCache | None = None,
    ) -> None:
        _TaskSet.__init__(self, tasks, preprocess, in_channels, channel_fill, cache)
        self.items = [(t, r) for t, task in enumerate(self.tasks) for r in task.cases(split)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        t, ref = self.items[i]
        vol = self.volume(t, ref)
        image = _fit_channels(vol.image, self.in_channels, self.channel_fill)
        meta = dict(vol.meta, task=self.tasks[t].name)
        return (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                torch.from_numpy(vol.label.astype(np.int64)), t, ref.case_id, meta)

    def original_label(self, i: int) -> np.ndarray:
        """Label of item ``i`` on the case's original grid, int64 ``[*meta["original_shape"]]``
        (what metrics are computed against, with ``meta["original_spacing"]``)."""
        t, ref = self.items[i]
        vol = self.volume(t, ref)
        if tuple(vol.meta["original_shape"]) == vol.label.shape:
            return vol.label.astype(np.int64)
        return self.cache.original_label(ref)
