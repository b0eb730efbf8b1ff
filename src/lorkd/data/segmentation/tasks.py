"""Segmentation tasks: a data set's folder read (:mod:`.folders`), probed (:mod:`.formats`) and
split by patient (:mod:`.split`) into :class:`SegmentationTaskData`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorkd.data.paths import shared_data_dir
from lorkd.errors import ConfigError, DataError

from .cases import Case, CaseRef
from .folders import read_hdf5_folder, read_image_mask_folder, read_msd_folder, warn_rare_label_values
from .formats import load_label, probe_case
from .split import apply_split, load_split, save_split, split_cases

__all__ = ["SegmentationTaskData", "load_segmentation_task", "reader_options"]


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


def _scan_num_classes(refs: Sequence[CaseRef]) -> int:
    """``max + 1`` (at least 2) over every case's label map of class indices; a value in few label
    files is warned about with the files named (:func:`warn_rare_label_values`)."""
    counts: dict[int, int] = {}
    where: dict[int, list[str]] = {}
    for r in refs:
        values, n = np.unique(load_label(r), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
            where.setdefault(v, []).append(str(r.label_path))
    warn_rare_label_values(counts, where, len(refs))
    return max(2, int(max(counts)) + 1)


_READERS = {"hdf5": read_hdf5_folder, "msd": read_msd_folder, "folder": read_image_mask_folder}


_NOT_READER_OPTIONS = ("root", "num_classes", "lazy")  # given by load_segmentation_task itself


def reader_options(format: str) -> tuple[str, ...]:
    """The keys a task's ``reader`` section may hold for ``format``: the keyword arguments of its
    reader (:func:`read_hdf5_folder`, :func:`read_msd_folder`, :func:`read_image_mask_folder`) other
    than those :func:`load_segmentation_task` passes itself.

    Raises:
        ConfigError: an unknown format."""
    if format not in _READERS:
        raise ConfigError(f"unknown format {format!r} (use one of {sorted(_READERS)})")
    params = inspect.signature(_READERS[format]).parameters
    return tuple(name for name in params if name not in _NOT_READER_OPTIONS)


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
            num_classes = _scan_num_classes(refs)
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
