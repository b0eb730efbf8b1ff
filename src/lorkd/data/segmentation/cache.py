"""In-memory cache of preprocessed volumes, shared by the patch and volume datasets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cases import CaseRef
from .formats import load_case, load_label
from .preprocess import Preprocess, preprocess_case

__all__ = ["PreparedVolume", "VolumeCache"]


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
