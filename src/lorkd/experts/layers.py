"""Low-rank task experts on Linear, ConvNd and ConvTransposeNd layers, and per-task BatchNorm.

For task ``t`` an :class:`ExpertLayer` computes with ``W_t = W + (alpha / r) * B_t @ A_t``, where
``W`` is the wrapped layer's own weight viewed as a matrix ``[d0, d1]`` (``d0`` = first weight
dim, ``d1`` = the rest). The factors of all tasks are stored together: ``A [T, r, d1]`` and
``B [T, d0, r]``; ``B`` starts at zero, so a fresh student computes exactly what the wrapped
model computed.

A mixed batch is never split by task. Each row is gathered its own task's factors (``A[task]``,
``B[task]``), so a layer costs a fixed handful of operations whatever the number of tasks, in
one of two exact forms (same values and gradients):

``"lowrank"``
    the plain layer once on the whole batch with ``W``, plus the thin branch ``B_t A_t x`` for
    every row at once: ``A`` as one convolution with ``groups = rows`` (``r`` channels per row),
    ``B`` as one batched matmul. Extra FLOPs about ``r / out_channels``; memory that of the
    plain layer plus ``r`` channels. Needs ``groups == 1``.
``"merged"``
    every task's merged weight built in one batched product, gathered per row, and one
    convolution with ``groups = rows`` (the papers' form). Extra memory one weight per row, so
    it pays only where weights are small next to activations (early, wide-activation layers),
    and it is the form for grouped convolutions.

``layout="auto"`` picks ``merged`` for ``groups > 1`` and where ``rows x weight`` is no larger
than the layer's output, else ``lowrank``: a rule on shapes only, so a compiled step never
depends on the task mix. A batch routed to one task (``student(x, t)`` with an ``int``) runs the
plain layer with ``W_t``; without gradients the merged weights are cached until a weight
changes.

Soft routing (per-row mixture weights ``w [rows, T]``, :attr:`TaskRouting.weights`) computes
``W + sum_t w_t (alpha / r) B_t A_t`` per row in the same two forms: ``lowrank`` runs the ``A``
of every task stacked (``T r`` channels, one plain convolution or matmul on the whole batch),
scales each row's channels by its weights, and adds ``B`` reshaped ``[d0, T r]`` in one batched
product (the mixture of ``T`` rank-``r`` products is rank ``T r``; extra FLOPs about
``T r / out_channels``); ``merged`` builds each row's weight as ``W + w @ deltas`` (one matmul
over the ``T`` deltas). The formula is exact for any weights; rows summing to 1 is the routing's
contract, checked at the model's entry.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .routing import TaskRouting, active_routing

LAYOUTS = ("auto", "lowrank", "merged")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PLAIN_FORWARDS = {
    nn.Linear: nn.Linear.forward,
    nn.Conv1d: nn.Conv1d.forward,
    nn.Conv2d: nn.Conv2d.forward,
    nn.Conv3d: nn.Conv3d.forward,
    nn.ConvTranspose1d: nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d: nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d: nn.ConvTranspose3d.forward,
}


def conv_nd(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int = 1) -> Tensor:
    """``F.conv{1,2,3}d``, except that a float32 3D convolution of fewer than 16 rows on the CPU
    runs on oneDNN directly: PyTorch's own backend choice sends batch-1 3D convolutions (what
    the per-row grouped convolutions are) to a native kernel many times slower. Same values,
    autograd included."""
    n = x.dim() - 2
    if (n == 3 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] < 16
            and not isinstance(padding, str) and torch.backends.mkldnn.is_available()
            and not torch.compiler.is_compiling()):
        as3 = lambda v: (v,) * 3 if isinstance(v, int) else tuple(v)  # noqa: E731
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, as3(padding), as3(stride),
                                                 as3(dilation), groups)
    return _CONV[n](x, weight, bias, stride, padding, dilation, groups)


def ineligibility(module: nn.Module) -> str | None:
    """Why ``module`` cannot take experts, or ``None`` if it can.

    Eligible: ``nn.Linear``, ``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d`` (or subclasses
    that keep the standard ``forward``) with an initialised weight.
    """
    base_type = next((t for t in _PLAIN_FORWARDS if isinstance(module, t)), None)
    if base_type is None:
        return f"{type(module).__name__} is not a Linear/Conv/ConvTranspose layer"
    if type(module).forward is not _PLAIN_FORWARDS[base_type]:
        return f"{type(module).__name__} overrides forward(), so merged weights would not reproduce it"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return "weight is missing or not initialised (lazy module)"
    return None


class ExpertLayer(nn.Module):
    """A Linear/Conv/ConvTranspose layer with one low-rank expert per task.

    Args:
        base: the layer to wrap (kept as ``self.base``; its parameters are the shared ``W``).
        num_tasks: number of experts ``T``.
        rank: ``r >= 1``.
        alpha: scaling numerator; the expert is scaled by ``alpha / rank``.
        layout: ``"auto"``, ``"lowrank"`` or ``"merged"`` (see the module docstring).
        name: the layer's qualified name, used in error messages.

    Parameters: ``A [T, r, d1]`` (Kaiming-uniform) and ``B [T, d0, r]`` (zeros); row ``t`` of
    each is task ``t``'s factors (``B[t] @ A[t]`` is ``[d0, d1]``). Shapes: input and output are those of ``base`` (``[N, *, in]`` for
    Linear, ``[N, C, *spatial]`` for convolutions); rows must be routed by an enclosing
    ``ExpertModel`` (``N`` = ``k`` rows per sample times the batch).
    """

    def __init__(self, base: nn.Module, num_tasks: int, rank: int, alpha: float, layout: str = "auto", name: str = "") -> None:
        super().__init__()
        reason = ineligibility(base)
        if reason is not None:
            raise ValueError(f"cannot add experts to {name or type(base).__name__}: {reason}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self.layout = layout
        self.name = name
        weight = base.weight
        self._kind = "linear" if isinstance(base, nn.Linear) else ("conv_transpose" if base.transposed else "conv")
        self._spatial_dims = weight.dim() - 2
        rows, cols = weight.shape[0], weight[0].numel()
        self.A = nn.Parameter(torch.empty(num_tasks, self.rank, cols, dtype=weight.dtype, device=weight.device))
        self.B = nn.Parameter(torch.zeros(num_tasks, rows, self.rank, dtype=weight.dtype, device=weight.device))
        for a in self.A.data:  # each task's A as nn.Linear initialises an [r, d1] weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self._cache: tuple | None = None
        self._register_load_state_dict_pre_hook(_stack_old_keys(("A", "B"), "experts"))

    @property
    def num_tasks(self) -> int:
        return self.A.shape[0]

    # ------------------------------------------------------------------ weights
    @property
    def weight(self) -> Tensor:
        """The shared weight ``W`` (``base.weight``), for code that reads a layer's weight; it
        does not include any expert."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        """The shared bias (``base.bias``)."""
        return self.base.bias

    def task_weights(self) -> Tensor:
        """``[T, *base.weight.shape]``: ``W + (alpha / r) * B_t @ A_t`` for every task, built in one
        batched product (cached without gradients until ``W``, ``A`` or ``B`` changes)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._task_weights()
        key = (self.base.weight._version, self.A._version, self.B._version, self.base.weight.data_ptr(),
               self.A.data_ptr(), self.B.data_ptr(), self.A.dtype, self.A.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._task_weights())
        return self._cache[1]

    def _task_weights(self) -> Tensor:
        w = self.base.weight
        flat = w.reshape(1, w.shape[0], -1).expand(self.num_tasks, -1, -1)
        return torch.baddbmm(flat, self.B, self.A, alpha=self.scale).view(self.num_tasks, *w.shape)

    def merged_weight(self, task: int) -> Tensor:
        """``W + (alpha / r) * B_t @ A_t`` in the shape of ``base.weight``."""
        if not torch.is_grad_enabled():
            return self.task_weights()[task]
        weight = self.base.weight
        return torch.addmm(weight.reshape(weight.shape[0], -1), self.B[task], self.A[task], alpha=self.scale).view_as(weight)

    def extract(self, task: int) -> nn.Module:
        """A copy of ``base`` (its own class, no lorkd inside) with expert ``task`` merged in."""
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.weight.copy_(self.merged_weight(task))
        return plain

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        routing = active_routing(self.name or type(self.base).__name__)
        if routing.single is not None:
            routing.rows_per_sample(x)  # the same shape check as a mixed batch
            return self._plain(x, self.merged_weight(routing.single), output_size)
        if self.resolve_layout(x) == "merged":
            return self._merged(x, routing, output_size)
        return self._lowrank(x, routing, output_size)

    def resolve_layout(self, x: Tensor) -> str:
        """The form a mixed batch ``x`` runs in: ``merged`` for grouped convolutions (the only
        exact one there); else ``self.layout``, where ``auto`` means ``merged`` if the per-row
        weights are no larger than the layer's output, else ``lowrank``. Shapes only."""
        if getattr(self.base, "groups", 1) != 1:
            return "merged"
        if self.layout != "auto":
            return self.layout
        return "merged" if x.shape[0] * self.base.weight.numel() <= self._output_numel(x) else "lowrank"

    def _output_numel(self, x: Tensor) -> float:
        """Approximate element count of this layer's output for input ``x``."""
        if self._kind == "linear":
            return x.numel() / self.base.in_features * self.base.out_features
        stride = math.prod(self.base.stride)
        scale = stride if self._kind == "conv_transpose" else 1 / stride
        return x.numel() / self.base.in_channels * self.base.out_channels * scale

    def _lowrank(self, x: Tensor, routing: TaskRouting, output_size) -> Tensor:
        """``base(x) + s B_t A_t x`` per row: the thin branch as one grouped convolution (or batched
        matmul) with each row's ``A_t`` and one batched matmul with each row's ``B_t``. With soft
        routing, ``base(x) + s sum_t w_t B_t A_t x``: every task's ``A`` on every row, see
        :meth:`_lowrank_mixture`."""
        if routing.weights is not None:
            return self._lowrank_mixture(x, routing.row_weights(x, self.rank), output_size)
        base, r, n = self.base, self.rank, x.shape[0]
        tasks = routing.row_tasks(x)
        a, b = self.A.index_select(0, tasks), self.B.index_select(0, tasks)  # [N, r, d1], [N, d0, r]
        y = self._plain(x, base.weight, output_size)
        if self._kind == "linear":
            z = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2))  # [N, L, r]
            return torch.baddbmm(y.reshape(n, -1, y.shape[-1]), z, b.transpose(1, 2), alpha=self.scale).view(y.shape)
        kernel = tuple(base.weight.shape[2:])
        rows = x.reshape(1, n * x.shape[1], *x.shape[2:])
        if self._kind == "conv":
            rows, padding = self._padded(rows)
            z = conv_nd(rows, a.reshape(n * r, base.in_channels, *kernel), None, base.stride, padding, base.dilation, n)
            out = torch.baddbmm(y.reshape(n, base.out_channels, -1), b, z.reshape(n, r, -1), alpha=self.scale)
            return out.view(y.shape)
        # transposed: weight [in, out, *k] = B [in, r] @ A [r, out * k]: first B^T, then A transposed
        u = torch.bmm(b.transpose(1, 2), x.reshape(n, base.in_channels, -1))  # [N, r, L_in]
        delta = _CONV_T[self._spatial_dims](
            u.reshape(1, n * r, *x.shape[2:]), a.reshape(n * r, base.out_channels, *kernel), None, base.stride,
            base.padding, self._output_padding(x, output_size), n, base.dilation)
        return torch.add(y, delta.view(y.shape), alpha=self.scale)

    def _lowrank_mixture(self, x: Tensor, w: Tensor, output_size) -> Tensor:
        """``base(x) + s sum_t w_t B_t A_t x`` per row, ``w [N, T r]`` each row's task weights repeated
        ``r`` times (task-major, as the stacked factors): ``A`` of all tasks as one ``T r``-channel
        layer on the whole batch, each row's channels scaled by ``w``, then ``B`` as ``[d0, T r]``."""
        base, n, tr = self.base, x.shape[0], w.shape[1]
        b_all = self.B.permute(1, 0, 2).reshape(self.B.shape[1], tr)  # [d0, T r], column t r + j = B_t[:, j]
        y = self._plain(x, base.weight, output_size)
        if self._kind == "linear":
            z = torch.matmul(x.reshape(n, -1, x.shape[-1]), self.A.reshape(tr, -1).t())  # [N, L, T r]
            z = z * w.to(z.dtype).unsqueeze(1)
            return torch.addmm(y.reshape(-1, y.shape[-1]), z.reshape(-1, tr), b_all.t(), alpha=self.scale).view(y.shape)
        kernel = tuple(base.weight.shape[2:])
        if self._kind == "conv":
            rows, padding = self._padded(x)
            z = conv_nd(rows, self.A.reshape(tr, base.in_channels, *kernel), None, base.stride, padding, base.dilation)
            z = z.reshape(n, tr, -1)
            z = z * w.to(z.dtype).unsqueeze(2)
            out = torch.baddbmm(y.reshape(n, base.out_channels, -1), b_all.expand(n, -1, -1), z, alpha=self.scale)
            return out.view(y.shape)
        # transposed: weight [in, out, *k] = B [in, r] @ A [r, out * k]: first B^T (all tasks), then A transposed
        u = torch.matmul(b_all.t(), x.reshape(n, base.in_channels, -1))  # [N, T r, L_in]
        u = u * w.to(u.dtype).unsqueeze(2)
        delta = _CONV_T[self._spatial_dims](
            u.view(n, tr, *x.shape[2:]), self.A.reshape(tr, base.out_channels, *kernel), None, base.stride,
            base.padding, self._output_padding(x, output_size), 1, base.dilation)
        return torch.add(y, delta, alpha=self.scale)

    def _merged(self, x: Tensor, routing: TaskRouting, output_size) -> Tensor:
        """One call with each row's merged weight ``W_t`` (a convolution with ``groups = rows x
        groups``, or a batched matmul); with soft routing each row's weight is
        ``W + s sum_t w_t B_t A_t`` (one matmul of the weights with every task's delta)."""
        base, n = self.base, x.shape[0]
        if routing.weights is not None:
            w, t = base.weight, self.num_tasks
            deltas = torch.bmm(self.B, self.A).view(t, -1)  # [T, d0 d1]
            mix = routing.row_weights(x).to(deltas.dtype)
            weights = torch.addmm(w.reshape(1, -1), mix, deltas, alpha=self.scale).view(n, *w.shape)
        else:
            weights = self.task_weights().index_select(0, routing.row_tasks(x))  # [N, *weight.shape]
        if self._kind == "linear":
            flat = x.reshape(n, -1, x.shape[-1])
            y = torch.bmm(flat, weights.transpose(1, 2))
            return (y if base.bias is None else y + base.bias).view(*x.shape[:-1], base.out_features)
        rows = x.reshape(1, n * x.shape[1], *x.shape[2:])
        weights = weights.reshape(n * weights.shape[1], *weights.shape[2:])
        bias = None if base.bias is None else base.bias.repeat(n)
        groups = n * base.groups
        if self._kind == "conv":
            rows, padding = self._padded(rows)
            y = conv_nd(rows, weights, bias, base.stride, padding, base.dilation, groups)
        else:
            y = _CONV_T[self._spatial_dims](rows, weights, bias, base.stride, base.padding,
                                            self._output_padding(x, output_size), groups, base.dilation)
        return y.view(n, -1, *y.shape[2:])

    def _padded(self, x: Tensor) -> tuple[Tensor, object]:
        """``(x, padding)`` for a convolution with the base layer's padding: non-zero padding modes
        are applied to ``x`` here (then padding 0)."""
        base = self.base
        if base.padding_mode == "zeros":
            return x, base.padding
        return F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0

    def _plain(self, x: Tensor, weight: Tensor, output_size) -> Tensor:
        """The wrapped layer's own computation with ``weight`` in place of its weight."""
        base = self.base
        if self._kind == "linear":
            return F.linear(x, weight, base.bias)
        if self._kind == "conv":
            x, padding = self._padded(x)
            return conv_nd(x, weight, base.bias, base.stride, padding, base.dilation, base.groups)
        return _CONV_T[self._spatial_dims](
            x, weight, base.bias, base.stride, base.padding, self._output_padding(x, output_size), base.groups,
            base.dilation)

    def _output_padding(self, x: Tensor, output_size) -> tuple[int, ...]:
        base = self.base
        if output_size is None:
            return base.output_padding
        return base._output_padding(x, output_size, base.stride, base.padding, base.kernel_size, self._spatial_dims,
                                    base.dilation)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, rank={self.rank}, alpha={self.alpha:g}, layout={self.layout!r}"


class TaskBatchNorm(nn.Module):
    """One BatchNorm per task: each task's rows are normalised with that task's own batch
    statistics, running statistics and affine parameters, so no information crosses tasks.

    Args:
        norm: the BatchNorm to copy (``nn.BatchNorm1d/2d/3d``).
        num_tasks: ``T`` copies are made.

    Parameters and buffers are stacked over tasks: ``weight``, ``bias``, ``running_mean``,
    ``running_var`` ``[T, C]`` and ``num_batches_tracked [T]`` (counted per task: a task absent
    from a batch keeps its running statistics and count). The per-task statistics of a mixed
    batch take a fixed number of operations whatever the number of tasks: per-row mean and
    variance, then per-task averages by one product with the routing's ``[T, rows]`` weights.

    Trade-off: each task's statistics come from its share of the batch only (noisier with
    many tasks and small batches), in exchange for exact gradient separation. A task present
    with one value per channel (one row, no spatial extent) is normalised with its running
    statistics (left unchanged), or without running statistics maps to the norm's bias, as the
    BatchNorm formula gives with variance 0.

    Soft routing (mixture weights): each row is normalised as a row of its **top task** (the
    argmax of its weights, :attr:`TaskRouting.task_ids`), with that task's statistics over the rows
    whose top task it is, its running statistics and its affine parameters: a per-task norm of a
    router model behaves as with hard ids given by the router's choice. The routing weights get no
    gradient through the norm (the argmax is piecewise constant); they get theirs through the
    expert layers. Mixing the ``T`` norms per row by the weights would need every task's
    statistics on every row (``T`` times the norm's work) and would let a row's loss reach every
    task's statistics; the top-task rule keeps the norm's cost and its gradient separation.

    Raises:
        ValueError: ``norm`` is a ``SyncBatchNorm`` (per-task statistics are per rank here).
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, num_tasks: int, name: str = "") -> None:
        super().__init__()
        if isinstance(norm, nn.SyncBatchNorm):
            raise ValueError(f"{name or 'SyncBatchNorm'}: norm='per_task' does not synchronise statistics across "
                             "ranks; convert the model to plain BatchNorm first or use norm='shared'")
        self.num_features, self.eps, self.momentum = norm.num_features, norm.eps, norm.momentum
        self.affine, self.track_running_stats = norm.affine, norm.track_running_stats
        self.name = name
        self._template = [copy.deepcopy(norm)]  # not a submodule: extract() copies its class and settings

        def stacked(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().unsqueeze(0).repeat(num_tasks, *([1] * t.dim())).clone()

        self.weight = None if norm.weight is None else nn.Parameter(stacked(norm.weight))
        self.bias = None if norm.bias is None else nn.Parameter(stacked(norm.bias))
        self.register_buffer("running_mean", stacked(norm.running_mean))
        self.register_buffer("running_var", stacked(norm.running_var))
        self.register_buffer("num_batches_tracked", stacked(norm.num_batches_tracked))
        self._register_load_state_dict_pre_hook(_stack_old_keys(
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"), "norms"))

    @property
    def num_tasks(self) -> int:
        return self._stacked_any().shape[0]

    def _stacked_any(self) -> Tensor:
        return next(t for t in (self.weight, self.running_mean, self.num_batches_tracked) if t is not None)

    def forward(self, x: Tensor) -> Tensor:
        routing = active_routing(self.name or "TaskBatchNorm")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{self.name or 'TaskBatchNorm'}: expected input [N, {self.num_features}, ...], "
                             f"got {list(x.shape)}")
        tasks = routing.row_tasks(x)
        if not (self.training or self.running_mean is None):  # running statistics: BatchNorm's inference kernel
            rm, rv = _per_row(tasks, self.running_mean, self.running_var)  # buffers apart: no gradient
            w, b = _per_row(tasks, self.weight, self.bias)
            flat = x.reshape(1, x.shape[0] * self.num_features, -1)
            return F.batch_norm(flat, rm, rv, w, b, False, 0.0, self.eps).view_as(x)
        weights = routing.norm_weights(x)
        track = self.training and self.running_mean is not None
        # a task with one value per channel has no batch statistics: it uses its running ones
        batch_stats = weights.update.view(-1) if x[0, 0].numel() == 1 and track else None
        running = (self.running_mean, self.running_var) if track else (None, None)
        y, mean, var = _TaskNorm.apply(x, self.weight, self.bias, tasks, weights.reduce, batch_stats, *running, self.eps)
        if track:
            with torch.no_grad():
                self.num_batches_tracked.add_(weights.update_count)
                if self.momentum is None:  # cumulative average
                    momentum = weights.update / self.num_batches_tracked.clamp(min=1).unsqueeze(1)
                else:
                    momentum = weights.momentum(self.momentum)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * weights.unbias, momentum)
        return y

    def extract(self, task: int) -> nn.Module:
        """Task ``task``'s BatchNorm: a copy of the wrapped norm's class with this task's values."""
        norm = copy.deepcopy(self._template[0]).to(self._stacked_any().device)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                value = getattr(self, name)
                if value is not None:
                    getattr(norm, name).copy_(value[task])
        norm.train(self.training)
        return norm

    def extra_repr(self) -> str:
        return f"{self.num_features}, tasks={self.num_tasks}, eps={self.eps}, momentum={self.momentum}"


class _TaskNorm(torch.autograd.Function):
    """Per-task batch normalisation of ``x [N, C, *]`` in a few passes over the activations.

    Each row's channels are normalised by PyTorch's own BatchNorm kernel run on ``x`` viewed as
    ``[1, N * C, L]`` in inference form, with the row's task statistics and affine parameters
    given per (row, channel); its backward kernel gives the per-(row, channel) sums of ``g`` and
    ``g * xhat`` in the same pass, from which the batch-statistics terms of the gradient follow
    per task. (Autograd through the same maths costs several times more.)

    ``tasks [N]`` is each row's task; ``reduce [2T, N]`` averages (first ``T`` rows) and sums
    (last ``T``) over each task's rows (:meth:`TaskRouting.norm_weights`). Returns ``y``
    (``x``'s shape) and the per-task ``mean``, biased ``var`` ``[T, C]`` (not differentiable).
    Where ``batch_stats [T]`` (bool, or ``None``: all true) is false, that task is normalised
    with ``running_mean``/``running_var`` and its statistics are constants for the gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tasks, reduce, batch_stats, running_mean, running_var, eps):
        rows, c = x.shape[:2]
        num_tasks = reduce.shape[0] // 2
        flat = x.reshape(1, rows * c, -1)
        sums = torch.cat([flat.sum(dim=2).view(rows, c), _squared(torch.linalg.vector_norm(flat, 2, dim=2)).view(rows, c)],
                         dim=1)  # [N, 2C]: per-row sums of x and x^2
        moments = reduce[:num_tasks] @ sums  # [T, 2C]: E[x], E[x^2]
        mean = moments[:, :c]
        var = moments[:, c:].addcmul(mean, mean, value=-1).relu_()  # (rounding can make it slightly negative)
        if batch_stats is not None:
            keep = batch_stats.unsqueeze(1)
            mean, var = torch.where(keep, mean, running_mean), torch.where(keep, var, running_var)
        stats = _per_row(tasks, mean, var, weight, bias)
        # written through a view into a tensor of x's shape: an output that is a view (or a
        # view taken by the caller) could not be modified in place (ReLU(inplace=True)) cheaply
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.ops.aten.native_batch_norm.out(flat, stats[2], stats[3], stats[0], stats[1], False, 0.0, eps,
                                             out=y.view(flat.shape), save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
        ctx.save_for_backward(flat, tasks, reduce, batch_stats, mean, var, weight, *stats[:3])
        ctx.eps, ctx.has_bias, ctx.input_shape = eps, bias is not None, x.shape
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # mean and var get no gradient: no zero tensors made for them
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        flat, tasks, reduce, batch_stats, mean, var, weight, row_mean, row_var, row_weight = ctx.saved_tensors
        rows, c = tasks.shape[0], mean.shape[1]
        num_tasks = reduce.shape[0] // 2
        # inference-form backward: a g per value, and per (row, channel) sum(g * xhat), sum(g)
        grad_inf, g_xhat, g_sum = torch.ops.aten.native_batch_norm_backward(
            grad_y.reshape(flat.shape), flat, row_weight, row_mean, row_var, None, None, False, ctx.eps,
            [ctx.needs_input_grad[0], True, True])
        task = reduce @ torch.cat([g_sum.view(rows, c), g_xhat.view(rows, c)], dim=1)  # [2T, 2C]: means; sums
        grad_bias = task[num_tasks:, :c] if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_weight = task[num_tasks:, c:] if weight is not None and ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            e_g, e_gxhat = task[:num_tasks, :c], task[:num_tasks, c:]  # E[g], E[g xhat] per task
            if batch_stats is not None:  # tasks normalised with running statistics: constants
                keep = batch_stats.unsqueeze(1).to(e_g.dtype)
                e_g, e_gxhat = e_g * keep, e_gxhat * keep
            inv = torch.rsqrt(var + ctx.eps)
            a = inv if weight is None else inv * weight
            b = a * inv * e_gxhat  # dx = a g - b x - c per task and channel (a g is grad_inf)
            cc = torch.addcmul(a * e_g, b, mean, value=-1)
            per_row = _per_row(tasks, b, cc)
            grad_x = grad_inf.addcmul_(flat, per_row[0].view(1, -1, 1), value=-1).sub_(per_row[1].view(1, -1, 1))
            grad_x = grad_x.view(ctx.input_shape)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None


def _per_row(tasks: Tensor, *per_task: Tensor | None) -> list[Tensor | None]:
    """Each ``[T, C]`` tensor gathered to its rows' tasks as ``[N * C]`` (one gather, one copy)."""
    present = [t for t in per_task if t is not None]
    if not present:
        return [None] * len(per_task)
    gathered = torch.stack(present).index_select(1, tasks)  # [k, N, C]
    it = iter(gathered.view(len(present), -1))
    return [None if t is None else next(it) for t in per_task]


def _squared(t: Tensor) -> Tensor:
    return t.mul_(t)


def _stack_old_keys(names: tuple[str, ...], container: str):
    """A load-state-dict pre-hook that reads students saved before the factors were stacked
    (``{prefix}{container}.{t}.{name}`` per task) into the stacked ``{prefix}{name}``."""

    def hook(state_dict, prefix, *args) -> None:
        for name in names:
            old = sorted((int(k[len(prefix) + len(container) + 1:].split(".")[0]), k) for k in list(state_dict)
                         if k.startswith(f"{prefix}{container}.") and k.endswith(f".{name}")
                         and k[len(prefix) + len(container) + 1:].split(".")[0].isdigit())
            if old and f"{prefix}{name}" not in state_dict:
                state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(k) for _, k in old])

    return hook
