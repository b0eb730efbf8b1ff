"""Task routing: which expert each sample of a batch goes through.

Hard routing (one task id per sample) is done by *sorting* the batch by task once at the
model's entry, so that every task owns one contiguous segment of rows. Inside the network
each expert layer then works on views of its own task's rows: no per-sample kernels, no
copies of activations. Extra per-sample inputs are sorted with ``x``; the model's per-sample
outputs are put back in input order at the exit. A layer may see ``k`` rows per sample
(``k * B`` rows, sample-major: window attention, flattened tokens); its segments scale by ``k``.

The routing of the forward pass in progress is held in a context variable, so expert
layers find it without the task ids being threaded through every ``forward`` signature.
A later soft router (mixture weights per sample) would be a second routing class read by
the same layers; single-task batches are the one-segment case of this one.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

_ACTIVE: ContextVar["TaskRouting | None"] = ContextVar("lorkd_routing", default=None)


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, start + length)`` of the sorted batch all belong to ``task``."""

    task: int
    start: int
    length: int


@dataclass(frozen=True)
class TaskRouting:
    """Hard routing of a batch of ``batch_size`` samples.

    ``order`` is the permutation that sorts the input rows by task (``None`` when they are
    sorted already); ``segments`` lists the tasks present, in increasing task order.
    """

    batch_size: int
    segments: tuple[Segment, ...]
    order: Tensor | None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def tasks(self) -> tuple[int, ...]:
        """The task ids present in the batch, sorted."""
        return tuple(s.task for s in self.segments)

    def rows_per_sample(self, x: Tensor) -> int:
        """``k`` where ``x`` holds ``k * batch_size`` rows, sample-major (``k = 1`` for a plain batch).

        Layers that see several rows per sample (window attention over ``[B * windows, tokens, C]``,
        tokens flattened to ``[B * N, C]``) must keep each sample's ``k`` rows contiguous and in
        sample order, as ``reshape`` of a batch-first tensor does.

        Raises:
            RuntimeError: ``x.shape[0]`` is not a positive multiple of the routed batch size.
        """
        rows = x.shape[0] if x.dim() else 0
        if rows == self.batch_size:
            return 1
        if rows == 0 or rows % self.batch_size:
            raise RuntimeError(
                f"an expert layer got a tensor with {rows} rows in a batch routed for "
                f"{self.batch_size}; lorkd routes along dim 0, so every input to a layer with experts "
                f"must hold the batch (or k rows per sample, sample-major: k * {self.batch_size} rows) "
                "as its first dimension"
            )
        return rows // self.batch_size

    def split(self, x: Tensor) -> Iterator[tuple[Segment, Tensor]]:
        """Yield ``(segment, rows)`` with each task's rows of ``x`` (views, no copies).

        ``x`` holds ``k * batch_size`` rows for some ``k >= 1`` (see :meth:`rows_per_sample`);
        task segments are scaled by ``k``.

        Raises:
            RuntimeError: ``x.shape[0]`` is not a multiple of the routed batch size.
        """
        k = self.rows_per_sample(x)
        if len(self.segments) == 1:
            yield self.segments[0], x
            return
        # One split (not one narrow per segment): its backward is a single concatenation,
        # where per-segment narrows would each scatter into a zero tensor of the full size.
        yield from zip(self.segments, x.split([k * s.length for s in self.segments]))

    def block_mask(self, block: int, dtype: torch.dtype, device: torch.device, k: int = 1) -> Tensor:
        """``[k * B, P * block]``: row ``i`` is 1 on the ``block`` columns of its own task's position
        among the present tasks, 0 elsewhere (``k`` rows per sample, sample-major). Computed once
        per routing and reused by every layer."""
        key = (block, dtype, device, k)
        if key not in self._cache:
            lengths = torch.tensor([k * s.length for s in self.segments])
            local = torch.repeat_interleave(torch.arange(len(self.segments)), lengths)
            mask = torch.nn.functional.one_hot(local, len(self.segments)).repeat_interleave(block, dim=1)
            self._cache[key] = mask.to(device=device, dtype=dtype)
        return self._cache[key]

    def to_sorted(self, value: Any, keep: Callable[[str, Tensor], bool] | None = None) -> Any:
        """Reorder every tensor with ``batch_size`` rows inside ``value`` into task order
        (those for which ``keep(path, tensor)`` is true are left alone; see :meth:`to_input_order`)."""
        if self.order is None:
            return value
        return _map_batch_tensors(value, self.batch_size, lambda t: t.index_select(0, self.order.to(t.device)), keep)

    def to_input_order(self, value: Any, keep: Callable[[str, Tensor], bool] | None = None) -> Any:
        """Undo :meth:`to_sorted` on every tensor with ``batch_size`` rows inside ``value``.

        ``keep(path, tensor)`` returning true leaves that tensor as it is; ``path`` names its place
        in ``value``: dict keys and sequence indices joined by dots (``"logits"``, ``"1.0"``),
        ``""`` for a bare tensor.
        """
        if self.order is None:
            return value
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.batch_size, device=self.order.device)
        return _map_batch_tensors(value, self.batch_size, lambda t: t.index_select(0, inverse.to(t.device)), keep)


def route(task_ids: Tensor | int, batch_size: int, num_tasks: int, device: torch.device | None = None) -> TaskRouting:
    """Build the hard routing for ``task_ids``.

    Args:
        task_ids: integer tensor ``[B]`` (any mix, any order), or one ``int`` for the whole batch.
        batch_size: ``B``, the number of rows of the model input.
        num_tasks: ``T``; valid ids are ``0 .. T-1``.
        device: where the permutation lives (the input's device).

    Raises:
        ValueError: ``task_ids`` is not an integer tensor of shape ``[B]``, or holds an id
            outside ``[0, T)``; the message names the offending value.
    """
    if isinstance(task_ids, bool) or not isinstance(task_ids, (int, Tensor)):
        raise ValueError(f"task_ids must be an int or an integer tensor of shape [{batch_size}], got {type(task_ids).__name__}")
    if isinstance(task_ids, int):
        _check_id(task_ids, num_tasks)
        return TaskRouting(batch_size, (Segment(task_ids, 0, batch_size),), None)
    if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must have an integer dtype, got {task_ids.dtype}")
    if task_ids.dim() != 1 or task_ids.shape[0] != batch_size:
        raise ValueError(f"task_ids must have shape [{batch_size}] (one id per sample), got {list(task_ids.shape)}")
    if batch_size == 0:
        raise ValueError("cannot route an empty batch (0 rows)")
    ids = task_ids.detach().to("cpu", torch.int64)
    low, high = int(ids.min()), int(ids.max())
    _check_id(low if low < 0 else high, num_tasks)
    counts = torch.bincount(ids, minlength=num_tasks).tolist()
    segments, start = [], 0
    for task, count in enumerate(counts):
        if count:
            segments.append(Segment(task, start, count))
            start += count
    already_sorted = bool((ids[1:] >= ids[:-1]).all())
    order = None if already_sorted else torch.argsort(ids, stable=True).to(device or task_ids.device)
    return TaskRouting(batch_size, tuple(segments), order)


def _check_id(task: int, num_tasks: int) -> None:
    if not 0 <= task < num_tasks:
        raise ValueError(f"task id {task} is out of range: this model has experts for tasks 0..{num_tasks - 1}")


def active_routing(layer_name: str = "an expert layer") -> TaskRouting:
    """The routing of the forward pass in progress.

    Raises:
        RuntimeError: no routed forward is in progress (the inner model was called directly
            instead of through the ``ExpertModel`` with task ids).
    """
    routing = _ACTIVE.get()
    if routing is None:
        raise RuntimeError(
            f"{layer_name} was called without task ids: call the ExpertModel as student(x, task_ids), "
            "or use student.extract(t) for a plain single-task model"
        )
    return routing


@contextlib.contextmanager
def routing_scope(routing: TaskRouting) -> Iterator[TaskRouting]:
    """Make ``routing`` the active routing for the duration of the ``with`` block."""
    token = _ACTIVE.set(routing)
    try:
        yield routing
    finally:
        _ACTIVE.reset(token)


def _map_batch_tensors(value: Any, batch_size: int, fn, keep=None, path: str = "") -> Any:
    """Apply ``fn`` to every tensor with ``batch_size`` rows in a nested tuple/list/dict, except
    where ``keep(path, tensor)`` is true."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != batch_size or (keep is not None and keep(path, value)):
            return value
        return fn(value)

    def sub(key, v):
        return _map_batch_tensors(v, batch_size, fn, keep, f"{path}.{key}" if path else str(key))

    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(sub(k, v) for k, v in zip(value._fields, value)))
    if isinstance(value, (tuple, list)):
        return type(value)(sub(i, v) for i, v in enumerate(value))
    if isinstance(value, dict):
        return type(value)((k, sub(k, v)) for k, v in value.items())
    return value
