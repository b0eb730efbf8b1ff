"""Task routing: which expert each sample of a batch goes through.

Hard routing gives every sample one task id. The routing is computed once per forward pass
from the ids, on their device, and read by every expert layer and per-task norm: rows are
never reordered, and every tensor a layer needs (each row's task, per-task row weights) has a
shape that depends on the batch size and the number of tasks only, never on which tasks are
present. So the work per layer is a fixed handful of operations whatever the task mix, there
is no host synchronisation inside the forward, and ``torch.compile`` captures one graph for
every mix of a given batch size.

A layer may see ``k`` rows per sample (``k * B`` rows, sample-major: window attention,
flattened tokens); each sample's task is then repeated ``k`` times.

The routing of the forward pass in progress is held in a module-level stack (which
``torch.compile`` traces, unlike a context variable), so expert layers find it without the task
ids being threaded through every ``forward`` signature. One forward at a time per process:
threads that run expert models concurrently (``nn.DataParallel``) are not supported; use DDP. A
single task for the whole batch is :attr:`TaskRouting.single`.

Soft routing (MoLA-Router) gives each sample mixture weights ``w [B, T]`` over the experts instead
of one id (:attr:`TaskRouting.weights`); the same expert layers read it and compute
``W + sum_t w_t (alpha / r) B_t A_t`` per row. A soft routing still carries ``task_ids``: each
row's top task (the argmax of its weights), which per-task norms use (see
:class:`~lorkd.experts.layers.TaskBatchNorm`). Hard ids are the fast path, and equal one-hot
weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

_ACTIVE: list["TaskRouting"] = []  # the routing of the forward in progress is the last one


class TaskRouting:
    """The routing of a batch of ``batch_size`` samples over ``num_tasks`` experts.

    Attributes:
        task_ids: LongTensor ``[B]``, the task of each sample, in input order, on the input's device
            (with soft routing: each sample's top task, the argmax of its weights).
        single: the task id when the caller gave one ``int`` for the whole batch, else ``None``
            (layers then use that task's merged weights directly).
        weights: ``None`` for hard routing, else the float mixture weights ``[B, T]`` (rows
            non-negative, summing to 1) that expert layers mix their experts with.
    """

    def __init__(self, task_ids: Tensor, num_tasks: int, single: int | None = None, weights: Tensor | None = None) -> None:
        self.task_ids = task_ids
        self.batch_size = task_ids.shape[0]
        self.num_tasks = num_tasks
        self.single = single
        self.weights = weights
        self._cache: dict = {}

    def rows_per_sample(self, x: Tensor) -> int:
        """``k`` where ``x`` holds ``k * batch_size`` rows, sample-major (``k = 1`` for a plain batch).

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

    def row_tasks(self, x: Tensor) -> Tensor:
        """LongTensor ``[x.shape[0]]``: the task of each row of ``x`` (``k`` rows per sample)."""
        k = self.rows_per_sample(x)
        key = ("rows", k)
        if key not in self._cache:
            self._cache[key] = self.task_ids if k == 1 else self.task_ids.repeat_interleave(k)
        return self._cache[key]

    def onehot(self, x: Tensor) -> Tensor:
        """BoolTensor ``[T, x.shape[0]]``: ``onehot[t, i]`` is true where row ``i`` of ``x`` belongs to
        task ``t`` (a comparison, not ``one_hot``, which reads the largest id back to the host)."""
        key = ("onehot", self.rows_per_sample(x))
        if key not in self._cache:
            tasks = torch.arange(self.num_tasks, device=self.task_ids.device).unsqueeze(1)
            self._cache[key] = self.row_tasks(x).unsqueeze(0) == tasks
        return self._cache[key]

    def row_weights(self, x: Tensor, repeat: int = 1) -> Tensor:
        """Soft routing only: ``[x.shape[0], T * repeat]``, each row's mixture weights (``k`` rows per
        sample), each task's weight repeated ``repeat`` times in a row (``repeat = r``: one weight
        per channel of the stacked ``A`` of all tasks, task-major).

        Raises:
            RuntimeError: the routing is hard (``weights is None``).
        """
        if self.weights is None:
            raise RuntimeError("row_weights() needs a soft routing (mixture weights), this one routes by task ids")
        k = self.rows_per_sample(x)
        key = ("weights", k, repeat)
        if key not in self._cache:
            w = self.weights if k == 1 else self.weights.repeat_interleave(k, dim=0)
            if repeat > 1:
                w = w.unsqueeze(2).expand(-1, -1, repeat).reshape(w.shape[0], -1)
            self._cache[key] = w
        return self._cache[key]

    def counts(self) -> Tensor:
        """LongTensor ``[T]``: samples per task in this batch (0 for absent tasks)."""
        if "counts" not in self._cache:
            self._cache["counts"] = self.onehot(self.task_ids).sum(dim=1)
        return self._cache["counts"]

    def present(self) -> Tensor:
        """BoolTensor ``[T]``: which tasks have at least one sample in this batch (with soft routing:
        a non-zero weight on at least one sample; those experts get gradients)."""
        if self.weights is not None:
            return (self.weights > 0).any(dim=0)
        return self.counts() > 0

    def norm_weights(self, x: Tensor) -> "NormWeights":
        """What a per-task norm of ``x [k * B, C, *]`` needs, computed once per routing and shape
        (every norm of the same input size shares it); see :class:`NormWeights`."""
        k, length = self.rows_per_sample(x), x[0, 0].numel()
        key = ("norm", k, length, x.dtype, x.device)
        if key not in self._cache:
            onehot = self.onehot(x).to(x.dtype)  # [T, N]
            n = onehot.sum(dim=1, keepdim=True) * length  # values per channel, [T, 1]
            reduce = torch.cat([onehot / n.clamp(min=1), onehot])  # [2T, N]: per-task means, sums
            update = n > 1
            unbias = n / (n - 1).clamp(min=1)
            self._cache[key] = NormWeights(reduce, update, update.to(torch.long).view(-1), unbias)
        return self._cache[key]


class NormWeights:
    """Per-task reductions for a norm over ``values`` positions per row (see :meth:`TaskRouting.norm_weights`).

    Attributes:
        reduce: ``[2T, N]``: ``reduce[:T] @ s`` turns per-row sums ``s [N, *]`` into each task's
            mean over its values (rows times positions); ``reduce[T:] @ v`` sums ``v`` over each
            task's rows.
        update: ``[T, 1]`` bool: tasks with more than one value per channel (whose running
            statistics move); ``update_count`` the same as ``int64 [T]``.
        unbias: ``[T, 1]``: ``n / (n - 1)`` (1 where ``n <= 1``), biased to unbiased variance.
    """

    def __init__(self, reduce: Tensor, update: Tensor, update_count: Tensor, unbias: Tensor) -> None:
        self.reduce, self.update, self.update_count, self.unbias = reduce, update, update_count, unbias
        self._momentum: dict = {}

    def momentum(self, momentum: float) -> Tensor:
        """``[T, 1]``: ``momentum`` where the running statistics update, 0 elsewhere."""
        if momentum not in self._momentum:
            self._momentum[momentum] = self.update.to(self.unbias.dtype) * momentum
        return self._momentum[momentum]


def route(task_ids: Tensor | int, batch_size: int, num_tasks: int, device: torch.device | None = None) -> TaskRouting:
    """Build the routing for ``task_ids``: hard for task ids, soft for mixture weights.

    Args:
        task_ids: integer tensor ``[B]`` (any mix, any order), or one ``int`` for the whole batch;
            or a floating-point tensor ``[B, T]`` of mixture weights (soft routing, see
            :func:`check_weights`).
        batch_size: ``B``, the number of rows of the model input.
        num_tasks: ``T``; valid ids are ``0 .. T-1``.
        device: where the routing tensors live (the input's device; default: that of ``task_ids``).

    Raises:
        ValueError: ``task_ids`` is not an integer tensor of shape ``[B]``, or holds an id
            outside ``[0, T)``; the message names the offending value. Mixture weights that
            :func:`check_weights` refuses. (Under ``torch.compile`` the value checks are
            asynchronous device assertions instead, so that no value is read back to the host.)
    """
    if isinstance(task_ids, bool) or not isinstance(task_ids, (int, Tensor)):
        raise ValueError(f"task_ids must be an int or an integer tensor of shape [{batch_size}], got {type(task_ids).__name__}")
    if batch_size == 0:
        raise ValueError("cannot route an empty batch (0 rows)")
    if isinstance(task_ids, int):
        _check_id(task_ids, num_tasks)
        return TaskRouting(torch.full((batch_size,), task_ids, dtype=torch.long, device=device), num_tasks, task_ids)
    if task_ids.dtype.is_floating_point and task_ids.dim() == 1:
        raise ValueError(f"task_ids must have an integer dtype, got {task_ids.dtype} of shape {list(task_ids.shape)} "
                         f"(a float tensor routes softly: mixture weights of shape [{batch_size}, {num_tasks}])")
    if task_ids.dtype.is_floating_point:
        weights = check_weights(task_ids, batch_size, num_tasks).to(device=device or task_ids.device)
        return TaskRouting(weights.argmax(dim=1), num_tasks, weights=weights)
    if task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must have an integer dtype (or be float mixture weights [B, T]), got {task_ids.dtype}")
    if task_ids.dim() != 1 or task_ids.shape[0] != batch_size:
        raise ValueError(f"task_ids must have shape [{batch_size}] (one id per sample), got {list(task_ids.shape)}")
    ids = task_ids.to(device=device or task_ids.device, dtype=torch.long)
    if torch.compiler.is_compiling():
        torch._assert_async(((ids >= 0) & (ids < num_tasks)).all(), "task id out of range")
    elif ids.device.type == "cpu":
        low, high = int(ids.min()), int(ids.max())
        _check_id(low if low < 0 else high, num_tasks)
    else:  # one read-back at the model's entry, none inside the forward
        bad = ids[(ids < 0) | (ids >= num_tasks)]
        if bad.numel():
            _check_id(int(bad[0]), num_tasks)
    return TaskRouting(ids, num_tasks)


def weights_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a row of mixture weights of ``dtype`` may sum (``1e-4`` for float32/64, ``1e-2``
    for half precision)."""
    return 1e-4 if torch.finfo(dtype).bits >= 32 else 1e-2


def check_weights(weights: Tensor, batch_size: int, num_tasks: int) -> Tensor:
    """Check mixture weights for soft routing and return them.

    Args:
        weights: floating-point tensor ``[B, T]``: row ``i`` weights sample ``i``'s experts; finite,
            non-negative, each row summing to 1 within :func:`weights_tolerance`.
        batch_size: ``B``.
        num_tasks: ``T``.

    Raises:
        ValueError: naming ``weights`` and the problem: not a floating-point tensor, wrong shape,
            a non-finite or negative entry, or a row that does not sum to 1 (the first bad row and
            its value). Under ``torch.compile`` the value checks are an asynchronous device
            assertion instead.
    """
    if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point:
        what = weights.dtype if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating-point tensor [{batch_size}, {num_tasks}], got {what}")
    if weights.dim() != 2 or tuple(weights.shape) != (batch_size, num_tasks):
        raise ValueError(f"weights must have shape [{batch_size}, {num_tasks}] (batch, tasks), got {list(weights.shape)}")
    tol = weights_tolerance(weights.dtype)
    finite = torch.isfinite(weights).all(dim=1)
    nonneg = (weights >= 0).all(dim=1)
    sums = weights.sum(dim=1)
    ok = finite & nonneg & ((sums - 1).abs() <= tol)
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), "routing weights must be finite, non-negative and sum to 1 per row")
        return weights
    if bool(ok.all()):  # one read-back at the model's entry (on a GPU), none inside the forward
        return weights
    row = int((~ok).nonzero()[0, 0])
    if not bool(finite[row]):
        raise ValueError(f"weights must be finite: row {row} is {weights[row].tolist()}")
    if not bool(nonneg[row]):
        raise ValueError(f"weights must be non-negative: row {row} has {float(weights[row].min()):g}")
    raise ValueError(f"weights rows must sum to 1 (within {tol:g}): row {row} sums to {float(sums[row]):.6g}")


def top_k_weights(weights: Tensor, k: int) -> Tensor:
    """Keep each row's ``k`` largest weights, renormalised to sum to 1 (the rest exactly 0).

    Args:
        weights: ``[B, T]`` non-negative (e.g. a softmax over router logits).
        k: ``1 <= k <= T``; ``k = T`` returns the weights renormalised.

    Returns:
        ``[B, T]``; gradients flow to the kept weights (with ``k = 1`` the kept weight is 1 and its
        gradient 0: route with ``weights.argmax(1)`` as task ids instead, the fast path).

    Raises:
        ValueError: ``k`` is not an integer in ``[1, T]``.
    """
    num_tasks = weights.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_tasks:
        raise ValueError(f"top_k must be an integer in [1, {num_tasks}], got {k!r}")
    values, index = weights.topk(k, dim=-1)
    kept = torch.zeros_like(weights).scatter(-1, index, values)
    return kept / kept.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)


def _check_id(task: int, num_tasks: int) -> None:
    if not 0 <= task < num_tasks:
        raise ValueError(f"task id {task} is out of range: this model has experts for tasks 0..{num_tasks - 1}")


def active_routing(layer_name: str = "an expert layer") -> TaskRouting:
    """The routing of the forward pass in progress.

    Raises:
        RuntimeError: no routed forward is in progress (the inner model was called directly
            instead of through the ``ExpertModel`` with task ids).
    """
    if not _ACTIVE:
        raise RuntimeError(
            f"{layer_name} was called without task ids: call the ExpertModel as student(x, task_ids), "
            "or use student.extract(t) for a plain single-task model"
        )
    return _ACTIVE[-1]


@contextlib.contextmanager
def routing_scope(routing: TaskRouting) -> Iterator[TaskRouting]:
    """Make ``routing`` the active routing for the duration of the ``with`` block."""
    _ACTIVE.append(routing)
    try:
        yield routing
    finally:
        _ACTIVE.pop()
