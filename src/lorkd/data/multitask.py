"""Multi-task classification data (2D or 3D): one dataset over several tasks, task-mixing batches.

* :class:`MultiTaskDataset` concatenates one split of several :class:`ClassificationTask`\\ s; an
  item is ``(image [C, H, W] (or [C, D, H, W]) float32, label, task_id)``.
* :func:`collate_task_batch` stacks items into a :class:`TaskBatch`.
* :class:`TaskBatchSampler` yields batches (lists of dataset indices) that mix tasks, in
  proportional or balanced mode, split across distributed ranks, and resumable mid-epoch.

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
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lorkd.data.medmnist import ClassificationTask
from lorkd.errors import ConfigError, DataError


@dataclass
class TaskBatch:
    """A batch that mixes tasks.

    Attributes:
        images: float32 ``[B, C, H, W]`` (or ``[B, C, *spatial]``).
        labels: int64 ``[B]``, class index within the sample's own task (segmentation: label
            maps ``[B, *spatial]``).
        task_ids: int64 ``[B]``, index of the sample's task in the dataset's task list.
    """

    images: Tensor
    labels: Tensor
    task_ids: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TaskBatch":
        """Return a new batch with all three tensors on ``device``."""
        return TaskBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.images, self.labels, self.task_ids)))

    def pin_memory(self) -> "TaskBatch":
        """Return a copy in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return TaskBatch(self.images.pin_memory(), self.labels.pin_memory(), self.task_ids.pin_memory())

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def collate_task_batch(items: Sequence[tuple[Tensor, int, int]]) -> TaskBatch:
    """Stack ``(image [C, H, W], label, task_id)`` items into a :class:`TaskBatch` of ``B = len(items)``.

    Labels may also be label maps (segmentation: image ``[C, *spatial]``, label int64
    ``[*spatial]``); they are stacked to ``[B, *spatial]``.

    Raises:
        DataError: ``items`` is empty.
    """
    if len(items) == 0:
        raise DataError("collate_task_batch: got an empty list of items")
    images, labels, task_ids = zip(*items)
    dense = isinstance(labels[0], Tensor) and labels[0].ndim > 0  # segmentation: label maps
    return TaskBatch(
        torch.stack(images),
        torch.stack(labels).to(torch.int64) if dense else torch.as_tensor(labels, dtype=torch.int64),
        torch.as_tensor(task_ids, dtype=torch.int64),
    )


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


class TaskBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices that mix tasks; distributed-aware and resumable.

    Epoch order (the same on every rank, from ``seed + epoch``):

    * ``mode="proportional"``: a permutation of all indices, so tasks appear in proportion to
      their size and every index exactly once per epoch.
    * ``mode="balanced"``: every task contributes ``M = max task size`` draws, shuffled together.
      A smaller task of size ``n`` is oversampled: its indices repeated ``M // n`` times plus
      ``M % n`` of them drawn without replacement, so each of its samples appears
      ``M // n`` or ``M // n + 1`` times (lower variance than i.i.d. draws with replacement).
    * ``shuffle=False``: no randomness. Proportional gives ``0, 1, ..., N-1``; balanced cycles each
      task to ``M`` and interleaves the tasks round-robin.

    Distributed: the order is cut into global batches of ``batch_size * num_replicas``; rank ``r``
    takes slice ``[r * batch_size, (r + 1) * batch_size)`` of each, so the union over ranks of
    step ``k`` is exactly batch ``k`` of a single process with ``batch_size * num_replicas``.
    Uneven tail (``len % (batch_size * num_replicas) = m > 0``): with ``drop_last=True`` it is
    dropped. Otherwise it is split into contiguous pieces as even as possible (sizes differ by at
    most one, lower ranks get the larger ones) and each rank with a non-empty piece yields it as a
    final shorter batch. Nothing is padded or repeated, so when ``m < num_replicas`` some ranks
    have one batch fewer than others; use ``drop_last=True`` for DDP training, where every rank
    must run the same number of steps.

    Resuming: the sampler does not count what it yields (a ``DataLoader`` with workers pulls
    batches ahead of the training loop). Call :meth:`advance` once per batch the loop has
    actually consumed; :meth:`state_dict` records ``epoch`` and that count and the next
    ``__iter__`` after :meth:`load_state_dict` skips the consumed batches, continuing with
    exactly the next one. :meth:`set_epoch` resets the count to 0; call it at every epoch start
    (like ``DistributedSampler``), or every epoch repeats epoch 0's order.

    Args:
        dataset_or_task_sizes: a :class:`MultiTaskDataset` (or anything with ``task_sizes``) or
            the number of samples of each task; indices of task ``t`` start at the sum of the
            sizes before it.
        batch_size: samples per batch on each rank.
        mode: ``"proportional"`` or ``"balanced"``.
        seed: base seed; epoch ``e`` uses ``seed + e``.
        num_replicas, rank: distributed world size and this process's rank.
        drop_last: drop the incomplete global tail batch.
        shuffle: ``False`` for a deterministic ordered pass (evaluation).

    Raises:
        ConfigError: bad ``mode``, ``batch_size < 1``, ``num_replicas < 1``, ``rank`` outside
            ``[0, num_replicas)``, a task size < 1; or a mismatching state in :meth:`load_state_dict`.
    """

    MODES = ("proportional", "balanced")

    def __init__(
        self,
        dataset_or_task_sizes: Any,
        batch_size: int,
        mode: str = "proportional",
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        sizes = getattr(dataset_or_task_sizes, "task_sizes", dataset_or_task_sizes)
        self.task_sizes = [int(n) for n in sizes]
        if not self.task_sizes or min(self.task_sizes) < 1:
            raise ConfigError(f"TaskBatchSampler: task sizes must be a non-empty list of ints >= 1, "
                              f"got {self.task_sizes}")
        if mode not in self.MODES:
            raise ConfigError(f"TaskBatchSampler: mode must be one of {self.MODES}, got {mode!r}")
        if batch_size < 1:
            raise ConfigError(f"TaskBatchSampler: batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1:
            raise ConfigError(f"TaskBatchSampler: num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"TaskBatchSampler: rank must be in [0, {num_replicas}), got {rank}")
        self.batch_size, self.mode, self.seed = int(batch_size), mode, int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.drop_last, self.shuffle = bool(drop_last), bool(shuffle)
        self.epoch = 0
        self.batches_done = 0
        self._offsets = [0]
        for n in self.task_sizes:
            self._offsets.append(self._offsets[-1] + n)

    # ---- epoch order ------------------------------------------------------------------------
    @property
    def epoch_length(self) -> int:
        """Indices drawn per epoch over all ranks, before the tail is dropped."""
        return sum(self.task_sizes) if self.mode == "proportional" else max(self.task_sizes) * len(self.task_sizes)

    def epoch_order(self) -> Tensor:
        """int64 ``[epoch_length]``: this epoch's global index order (identical on every rank)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.mode == "proportional":
            n = self._offsets[-1]
            return torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        m = max(self.task_sizes)
        per_task = []
        for t, n in enumerate(self.task_sizes):
            local = torch.arange(m) % n  # full passes plus a partial one
            if self.shuffle:
                reps = [torch.randperm(n, generator=g) for _ in range(m // n)]
                extra = torch.randperm(n, generator=g)[: m % n]
                local = torch.cat([*reps, extra])
            per_task.append(local + self._offsets[t])
        if not self.shuffle:
            return torch.stack(per_task, 1).reshape(-1)  # round-robin over tasks
        order = torch.cat(per_task)
        return order[torch.randperm(len(order), generator=g)]

    def _rank_slices(self) -> list[tuple[int, int]]:
        """``(start, stop)`` in the epoch order of each batch this rank yields."""
        b, world = self.batch_size, self.num_replicas
        glob = b * world
        full, tail = divmod(self.epoch_length, glob)
        slices = [(k * glob + self.rank * b, k * glob + (self.rank + 1) * b) for k in range(full)]
        if tail and not self.drop_last:
            q, r = divmod(tail, world)
            start = full * glob + self.rank * q + min(self.rank, r)
            stop = start + q + (1 if self.rank < r else 0)
            if stop > start:
                slices.append((start, stop))
        return slices

    def __len__(self) -> int:
        """Batches per epoch on this rank (including any already consumed)."""
        return len(self._rank_slices())

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order().tolist()
        for start, stop in self._rank_slices()[self.batches_done:]:
            yield order[start:stop]

    # ---- epochs and resuming ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch``: reseed with ``seed + epoch`` and reset the consumed count to 0."""
        self.epoch = int(epoch)
        self.batches_done = 0

    def advance(self, n: int = 1) -> None:
        """Record that the training loop consumed ``n`` more batches of the current epoch."""
        if n < 0 or self.batches_done + n > len(self):
            raise ConfigError(f"TaskBatchSampler.advance: {self.batches_done} + {n} batches exceeds "
                              f"the {len(self)} batches of epoch {self.epoch}")
        self.batches_done += int(n)

    def state_dict(self) -> dict[str, Any]:
        """Epoch, batches consumed in it, and the settings that must match on resume."""
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "task_sizes": list(self.task_sizes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``__iter__`` continues with the next unconsumed batch.

        Raises:
            ConfigError: a key is missing, or ``seed``/``mode``/``batch_size``/``num_replicas``/
                ``task_sizes`` differ from this sampler's (the order would not be the same), or
                ``batches_done`` is out of range.
        """
        for key in ("epoch", "batches_done", "seed", "mode", "batch_size", "num_replicas", "task_sizes"):
            if key not in state:
                raise ConfigError(f"TaskBatchSampler.load_state_dict: missing key {key!r}")
        mine = self.state_dict()
        for key in ("seed", "mode", "batch_size", "num_replicas", "task_sizes"):
            theirs = list(state[key]) if key == "task_sizes" else state[key]
            if theirs != mine[key]:
                raise ConfigError(f"TaskBatchSampler.load_state_dict: {key}={state[key]!r} in the state "
                                  f"but {mine[key]!r} in this sampler")
        self.set_epoch(state["epoch"])
        self.advance(int(state["batches_done"]))
