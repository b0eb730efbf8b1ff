"""Task-mixing batches, independent of where the data come from.

* :class:`TaskBatch`: images, labels and task ids of one batch; :func:`collate_task_batch` stacks
  ``(image, label, task_id)`` items into one.
* :class:`TaskBatchSampler` yields batches (lists of dataset indices) that mix tasks, in
  proportional or balanced mode, split across distributed ranks, and resumable mid-epoch.

This module imports no dataset code (the training engine uses it); the MedMNIST-backed
:class:`~lorkd.data.multitask.MultiTaskDataset` lives in :mod:`lorkd.data.multitask`, which
re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from lorkd.errors import ConfigError, DataError

__all__ = ["TaskBatch", "TaskBatchSampler", "collate_task_batch"]


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
