"""Torch datasets over segmentation tasks: random training patches and whole volumes.

One code path serves 2D and 3D: arrays are ``[C, *spatial]`` images and ``[*spatial]`` labels
whatever ``spatial_dims`` is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lorkd.data.augment import Augment
from lorkd.errors import ConfigError

from .cache import PreparedVolume, VolumeCache
from .cases import CaseRef
from .preprocess import Preprocess
from .split import _largest_remainder
from .tasks import SegmentationTaskData

__all__ = ["PatchDataset", "VolumeDataset"]


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


def fit_channels(image: np.ndarray, channels: int, fill: str) -> np.ndarray:
    """``image`` ``[c, *spatial]`` with ``channels`` channels: as is, or extended by ``fill``
    (``data.channel_fill``) when it has fewer."""
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
        image = fit_channels(image, self.in_channels, self.channel_fill)
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
        image = fit_channels(vol.image, self.in_channels, self.channel_fill)
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
