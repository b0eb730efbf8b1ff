"""Multi-task classification data (2D or 3D): one dataset over several tasks, task-mixing batches.

* :class:`MultiTaskDataset` concatenates one split of several :class:`ClassificationTask`\\ s; an
  item is ``(image [C, H, W] (or [C, D, H, W]) float32, label, task_id)``.
* :func:`collate_task_batch` stacks items into a :class:`TaskBatch`, and :class:`TaskBatchSampler`
  yields batches that mix tasks; both live in :mod:`lorkd.data.batching` (which imports no dataset
  code) and are re-exported here.

Typical use::

    ds = MultiTaskDataset(tasks, "train", augment=True)
    sampler = TaskBatchSampler(ds, batch_size=64, mode="balanced", num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_task_batch)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch); ds.set_epoch(epoch)
        for batch in loader:
            ...                      # train on batch.images, batch.labels, batch.task_ids
            sampler.advance()        # one batch consumed: what state_dict() will record
"""

from __future__ import annotations

import bisect
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lorkd.data.batching import TaskBatch, TaskBatchSampler, collate_task_batch
from lorkd.data.medmnist import ClassificationTask
from lorkd.errors import DataError

__all__ = ["MultiTaskDataset", "TaskBatch", "TaskBatchSampler", "collate_task_batch"]  # the last three from lorkd.data.batching


class MultiTaskDataset(torch.utils.data.Dataset):
    """One split of several tasks, concatenated in task order.

    Item ``i`` is ``(image, label, task_id)``: image float32 ``[C, H, W]`` (volumes: ``[C, D, H, W]``;
    every task must have the same ``spatial_dims``) normalised as ``(x - mean) / std`` with ``x`` in
    [0, 1] (uint8 images divided by 255, float32 ones as stored), label an ``int`` in
    ``[0, num_classes[task_id])``.

    Channels: ``channels`` defaults to the largest ``task.channels``. A grayscale image going to
    a 3-channel model is repeated; an RGB image going to a 1-channel model is averaged.
    Size: with ``size`` set, images are resized to ``size x size`` with bilinear interpolation
    (antialiased; volumes to ``size^3``, trilinear); without it every task must share one size.
    Augmentation (``augment=True``): random horizontal flip, then a random affine map (rotation
    up to 10 degrees, scale 0.9-1.1, shift up to 8 % each way, reflection padding). Volumes get
    the same, applied in the ``H, W`` plane (rotation about the ``D`` axis) plus a shift up to
    8 % along ``D``; no flip along ``D`` (head-foot order is anatomy). Its randomness
    comes from a ``torch.Generator`` seeded by ``(seed, epoch, index)``, so it is reproducible and
    independent of ``DataLoader`` workers; call :meth:`set_epoch` each epoch for fresh draws
    (with ``persistent_workers=True`` the workers keep the epoch they were started with).

    Raises:
        DataError: no tasks; tasks mix 2D and 3D; a task lacks ``split``; tasks differ in size and no ``size`` is
            given; a task's channel count cannot be mapped to ``channels``; ``std <= 0``.
    """

    def __init__(
        self,
        tasks: list[ClassificationTask],
        split: str,
        size: int | None = None,
        channels: int | None = None,
        augment: bool = False,
        mean: float = 0.5,
        std: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not tasks:
            raise DataError("MultiTaskDataset: the task list is empty")
        for task in tasks:
            if split not in task.images:
                raise DataError(f"MultiTaskDataset: task {task.name!r} ({task.source}) has no split {split!r}; "
                                f"it has {list(task.images)}")
        dims = {task.name: task.spatial_dims for task in tasks}
        if len(set(dims.values())) > 1:
            raise DataError(f"MultiTaskDataset: tasks mix 2D images and 3D volumes (spatial_dims per task: {dims}); "
                            "one run takes one kind")
        self.spatial_dims = tasks[0].spatial_dims
        if size is None and len({task.image_size for task in tasks}) > 1:
            sizes = ", ".join(f"{task.name} ({task.source}): {task.image_size[0]}x{task.image_size[1]}" for task in tasks)
            raise DataError(f"tasks differ in image size ({sizes}); set data.size to resize every image to one "
                            f"size (e.g. --set data.size={max(max(task.image_size) for task in tasks)})")
        if size is not None and size < 1:
            raise DataError(f"MultiTaskDataset: size must be >= 1, got {size}")
        self.channels = int(channels) if channels is not None else max(task.channels for task in tasks)
        for task in tasks:
            if not (task.channels == self.channels or task.channels == 1 or self.channels == 1):
                raise DataError(f"MultiTaskDataset: task {task.name!r} has {task.channels} channels, "
                                f"cannot map them to channels={self.channels}")
        if std <= 0:
            raise DataError(f"MultiTaskDataset: std must be > 0, got {std}")
        self.tasks = list(tasks)
        self.split = split
        self.size = size
        self.augment = augment
        self.mean, self.std = float(mean), float(std)
        self.seed, self.epoch = int(seed), 0
        # uint8 (or float32 in [0, 1]) [N, C, *spatial] per task, kept small; float conversion per item.
        self._images = [self._channels_first(torch.from_numpy(task.images[split])) for task in tasks]
        self._labels = [torch.from_numpy(task.labels[split]).to(torch.int64) for task in tasks]
        sizes = [len(lab) for lab in self._labels]
        self._offsets = [0]
        for n in sizes:
            self._offsets.append(self._offsets[-1] + n)

    def _channels_first(self, images: Tensor) -> Tensor:
        """``[N, *spatial]`` or ``[N, *spatial, C]`` -> ``[N, C, *spatial]``."""
        return images.unsqueeze(1) if images.ndim == self.spatial_dims + 1 else images.movedim(-1, 1)

    # ---- task bookkeeping -------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """Task names in task-id order."""
        return [task.name for task in self.tasks]

    @property
    def num_classes(self) -> list[int]:
        """Number of classes of each task, in task-id order."""
        return [task.num_classes for task in self.tasks]

    @property
    def task_sizes(self) -> list[int]:
        """Number of samples of each task in this split."""
        return [b - a for a, b in zip(self._offsets[:-1], self._offsets[1:])]

    @property
    def task_offsets(self) -> list[int]:
        """Cumulative offsets, length ``T + 1``: task ``t`` owns indices ``[offsets[t], offsets[t+1])``."""
        return list(self._offsets)

    def task_indices(self, t: int) -> range:
        """The dataset indices of task ``t``; raises ``IndexError`` for ``t`` outside ``[0, T)``."""
        if not 0 <= t < len(self.tasks):
            raise IndexError(f"task id {t} out of range [0, {len(self.tasks)})")
        return range(self._offsets[t], self._offsets[t + 1])

    @property
    def labels(self) -> Tensor:
        """int64 ``[N]``: every item's label, in dataset order."""
        return torch.cat(self._labels)

    @property
    def task_ids(self) -> Tensor:
        """int64 ``[N]``: every item's task id, in dataset order."""
        return torch.repeat_interleave(torch.arange(len(self.tasks)), torch.tensor(self.task_sizes))

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that seeds augmentation."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Map a dataset index to ``(task_id, index within that task)``."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        t = bisect.bisect_right(self._offsets, index) - 1
        return t, index - self._offsets[t]

    # ---- items ------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        t, j = self.locate(int(index))
        index = self._offsets[t] + j
        x = self._images[t][j].to(torch.float32)  # [c, *spatial]
        if self._images[t].dtype == torch.uint8:
            x = x.div_(255.0)  # uint8 0-255; float32 images are stored in [0, 1] already
        if x.shape[0] != self.channels:
            x = x.expand(self.channels, *x.shape[1:]).clone() if x.shape[0] == 1 else x.mean(0, keepdim=True)
        target = (self.size,) * self.spatial_dims if self.size is not None else None
        if target is not None and tuple(x.shape[1:]) != target:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            x = F.interpolate(x[None], size=target, mode=mode, align_corners=False,
                              antialias=self.spatial_dims == 2)[0]
        if self.augment:
            x = self._augment(x, index)
        x = (x - self.mean) / self.std
        return x, int(self._labels[t][j]), t

    def _augment(self, x: Tensor, index: int) -> Tensor:
        """Random flip + small affine map of ``x`` ``[C, H, W]`` or ``[C, D, H, W]`` (in the ``H, W``
        plane, plus a shift along ``D``), seeded by (seed, epoch, index)."""
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, int(index)))
        flip, angle, scale, tx, ty, tz = torch.rand(6, generator=g).tolist()
        if flip < 0.5:
            x = x.flip(-1)
        angle = math.radians((angle * 2 - 1) * 10.0)
        scale = 0.9 + 0.2 * scale
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        if self.spatial_dims == 3:  # grid axes (x=W, y=H, z=D)
            theta = torch.tensor([[cos, -sin, 0.0, (tx * 2 - 1) * 0.16], [sin, cos, 0.0, (ty * 2 - 1) * 0.16],
                                  [0.0, 0.0, 1.0 / scale, (tz * 2 - 1) * 0.16]])
        else:
            theta = torch.tensor([[cos, -sin, (tx * 2 - 1) * 0.16], [sin, cos, (ty * 2 - 1) * 0.16]])
        grid = F.affine_grid(theta[None], [1, *x.shape], align_corners=False)
        return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def _mix(*values: int) -> int:
    """A 63-bit seed from a few integers (splitmix-style), so nearby tuples give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
