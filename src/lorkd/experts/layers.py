"""Low-rank task experts on Linear, ConvNd and ConvTransposeNd layers.

For task ``t`` the layer computes with ``W_t = W + (alpha / r) * B_t @ A_t``, where ``W`` is
the wrapped layer's own weight viewed as a matrix ``[d0, d1]`` (``d0`` = first weight dim,
``d1`` = the rest), ``A_t`` is ``[r, d1]`` and ``B_t`` is ``[d0, r]``. ``B_t`` starts at zero,
so a fresh student computes exactly what the wrapped model computed.

A batch routed by :mod:`lorkd.experts.routing` is sorted by task; each task's rows are a
contiguous segment. Four exact layouts of the computation are available per layer (same
values and gradients; they differ in speed and memory):

``"lowrank"``
    one call of the plain layer on the whole batch with ``W``, plus, per task segment, the
    low-rank branch ``B_t(A_t(x))`` (two thin convolutions or matmuls). Memory stays that of
    the plain layer; extra FLOPs are about ``r / out_channels``, but thin convolutions run far
    below peak speed on CPUs. Needs ``groups == 1``.
``"merged"``
    per task segment, one call of the plain layer with the merged weight ``W_t``. Extra
    memory is one weight per task present (kept for backward while training). Always used for
    single-task batches and for grouped convolutions.
``"fused"``
    the merged forward in one custom autograd function (:mod:`lorkd.experts.fused`) that keeps
    no per-task weight and computes the shared weight's gradient once on the full batch, the
    experts' gradients through thin layers. Linear and ``groups == 1`` zero-padded
    convolutions (else ``merged``); without gradients it is ``merged``.
``"stacked"``
    one convolution with ``[W; A_t1; ...; A_tP]`` stacked along the output channels (the shared
    weight and every present task's ``A`` in one call), then each row's ``B_t`` by one batched
    matmul. Extra compute about ``P r / out_channels``; convolutions with ``groups == 1`` only.

Each layer has a ``layout`` (used while gradients are enabled) and an ``infer_layout`` (used
under ``torch.no_grad()``), both set from ``add_experts(layout=...)``. ``"auto"`` picks
``merged`` for one segment, for ``groups > 1``, and where the merged weights are no larger
than the layer's output; else ``stacked`` for convolutions in training and ``lowrank`` for the
rest and for inference. ``ExpertModel.tune_layouts`` instead times the candidates per layer on
the machine at hand (``inference=True`` for ``infer_layout``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused import fused_forward, fused_supported
from .routing import active_routing

LAYOUTS = ("auto", "stacked", "lowrank", "merged", "fused")

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
    runs on oneDNN directly: PyTorch's own backend choice sends batch-1 and 1x1x1 3D
    convolutions (what per-task segments and thin branches are) to a native kernel many times
    slower. Same values, autograd included."""
    n = x.dim() - 2
    if (n == 3 and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] < 16
            and not isinstance(padding, str) and torch.backends.mkldnn.is_available()):
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


class LowRankExpert(nn.Module):
    """One task's factors ``A [r, d1]`` and ``B [d0, r]``; ``delta() = B @ A`` is ``[d0, d1]``."""

    def __init__(self, rows: int, cols: int, rank: int, dtype=None, device=None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, cols, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(rows, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self) -> Tensor:
        return self.B @ self.A


class ExpertLayer(nn.Module):
    """A Linear/Conv/ConvTranspose layer with one low-rank expert per task.

    Args:
        base: the layer to wrap (kept as ``self.base``; its parameters are the shared ``W``).
        num_tasks: number of experts ``T``.
        rank: ``r >= 1``.
        alpha: scaling numerator; the expert is scaled by ``alpha / rank``.
        layout: ``"auto"``, ``"stacked"``, ``"lowrank"``, ``"merged"`` or ``"fused"`` (see the module docstring);
            sets both ``layout`` (training) and ``infer_layout`` (without gradients).
        name: the layer's qualified name, used in error messages.

    Shapes: input and output are those of ``base`` (``[B, *, in]`` for Linear, ``[B, C, *spatial]``
    for convolutions); rows must be routed by an enclosing ``ExpertModel``.
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
        self.infer_layout = layout
        self.name = name
        weight = base.weight
        self._kind = "linear" if isinstance(base, nn.Linear) else ("conv_transpose" if base.transposed else "conv")
        self._spatial_dims = weight.dim() - 2
        rows, cols = weight.shape[0], weight[0].numel()
        self.experts = nn.ModuleList(
            LowRankExpert(rows, cols, self.rank, dtype=weight.dtype, device=weight.device) for _ in range(num_tasks)
        )

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

    def merged_weight(self, task: int) -> Tensor:
        """``W + (alpha / r) * B_t @ A_t`` in the shape of ``base.weight``."""
        weight = self.base.weight
        return weight + self.scale * self.experts[task].delta().view_as(weight)

    def extract(self, task: int) -> nn.Module:
        """A copy of ``base`` (its own class, no lorkd inside) with expert ``task`` merged in."""
        plain = copy.deepcopy(self.base)
        with torch.no_grad():
            plain.weight.copy_(self.merged_weight(task))
        return plain

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        routing = active_routing(self.name or type(self.base).__name__)
        layout = self.resolve_layout(len(routing.segments), x)
        if layout == "merged":
            outs = [self._plain(rows, self.merged_weight(seg.task), output_size) for seg, rows in routing.split(x)]
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        if layout == "stacked":
            return self._stacked(x, routing)
        if layout == "fused":
            return fused_forward(self, x, routing, self._output_padding(x, output_size) if self._kind == "conv_transpose" else None)
        y = self._plain(x, self.base.weight, output_size)
        branches = [self._branch(rows, self.experts[seg.task], output_size) for seg, rows in routing.split(x)]
        if not torch.is_grad_enabled():  # add in place: no concatenated copy of the branches
            for part, branch in zip(y.split([b.shape[0] for b in branches]), branches):
                part.add_(branch, alpha=self.scale)
            return y
        return torch.add(y, torch.cat(branches), alpha=self.scale)

    def resolve_layout(self, num_segments: int, x: Tensor | None = None) -> str:
        """The layout this call uses.

        ``merged`` for a single task and for grouped convolutions (where the others are not
        exact). Otherwise ``self.layout`` (``self.infer_layout`` without gradients); ``auto``
        means ``merged`` where the per-task weights are no larger than the layer's output
        (early, wide-activation layers, where it runs at the plain layer's speed), else
        ``stacked`` for convolutions in training and ``lowrank`` otherwise.
        """
        if num_segments == 1 or getattr(self.base, "groups", 1) != 1:
            return "merged"
        layout = self.layout if torch.is_grad_enabled() else self.infer_layout
        if layout == "fused" and not torch.is_grad_enabled():
            return "merged"  # the same forward, without the autograd function
        if layout == "auto":
            small = x is not None and num_segments * self.base.weight.numel() <= self._output_numel(x)
            layout = "merged" if small else ("stacked" if torch.is_grad_enabled() else "lowrank")
        if layout == "stacked" and self._kind != "conv":
            return "lowrank"
        if layout == "fused" and not fused_supported(self.base):
            return "merged"
        return layout

    def _output_numel(self, x: Tensor) -> float:
        """Approximate element count of this layer's output for input ``x``."""
        if self._kind == "linear":
            return x.numel() / self.base.in_features * self.base.out_features
        stride = math.prod(self.base.stride)
        scale = stride if self._kind == "conv_transpose" else 1 / stride
        return x.numel() / self.base.in_channels * self.base.out_channels * scale

    def _stacked(self, x: Tensor, routing) -> Tensor:
        """Convolution with ``[W; A_t1; ...; A_tP]`` stacked along the output channels (one call
        for the shared weight and every present task's ``A``); then each row keeps only its own
        task's ``r`` channels of the ``A`` outputs and one batched matmul with ``[B_t1 ... B_tP]``
        adds ``B_t A_t x`` to the shared output."""
        base, r = self.base, self.rank
        tasks = routing.tasks
        n_extra = len(tasks) * r
        a = torch.cat([self.experts[t].A for t in tasks]).view(n_extra, *base.weight.shape[1:])
        bias = None if base.bias is None else torch.cat([base.bias, base.bias.new_zeros(n_extra)])
        out = base._conv_forward(x, torch.cat([base.weight, a]), bias)
        rows, spatial = out.shape[0], out.shape[2:]
        y, z = out.split([base.out_channels, n_extra], dim=1)
        # each row keeps only its own task's r channels of z, then all rows share one [out, P r] B
        z = z.reshape(rows, n_extra, -1) * routing.block_mask(r, out.dtype, out.device, routing.rows_per_sample(out))[:, :, None]
        b = torch.stack([self.experts[t].B for t in tasks], dim=1).reshape(base.out_channels, n_extra)
        y = torch.baddbmm(y.reshape(rows, base.out_channels, -1), b.expand(rows, -1, -1), z, alpha=self.scale)
        return y.view(rows, base.out_channels, *spatial)

    def _plain(self, x: Tensor, weight: Tensor, output_size, output_padding=None) -> Tensor:
        """The wrapped layer's own computation with ``weight`` in place of its weight (transposed
        layers: ``output_padding`` if given, else the one ``output_size`` implies)."""
        base = self.base
        if self._kind == "linear":
            return F.linear(x, weight, base.bias)
        if self._kind == "conv":
            if base.padding_mode != "zeros":
                return base._conv_forward(x, weight, base.bias)
            return conv_nd(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)
        if output_padding is None:
            output_padding = self._output_padding(x, output_size)
        return _CONV_T[self._spatial_dims](
            x, weight, base.bias, base.stride, base.padding, output_padding, base.groups, base.dilation
        )

    def _branch(self, x: Tensor, expert: LowRankExpert, output_size) -> Tensor:
        """``B_t @ A_t`` applied to ``x`` as two thin layers (``groups == 1`` only), unscaled."""
        base = self.base
        if self._kind == "linear":
            return F.linear(F.linear(x, expert.A), expert.B)
        n = self._spatial_dims
        ones = (1,) * n
        kernel = tuple(base.weight.shape[2:])
        if self._kind == "conv":
            padding = base.padding
            if base.padding_mode != "zeros":
                x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
                padding = 0
            a = expert.A.view(self.rank, base.in_channels, *kernel)
            z = conv_nd(x, a, None, base.stride, padding, base.dilation)
            return conv_nd(z, expert.B.view(base.out_channels, self.rank, *ones), None, 1, 0, 1)
        # transposed: weight [in, out, *k] = B [in, r] @ A [r, out * k]
        z = conv_nd(x, expert.B.t().reshape(self.rank, base.in_channels, *ones), None, 1, 0, 1)
        a = expert.A.view(self.rank, base.out_channels, *kernel)
        return _CONV_T[n](z, a, None, base.stride, base.padding, self._output_padding(x, output_size), 1, base.dilation)

    def _output_padding(self, x: Tensor, output_size) -> tuple[int, ...]:
        base = self.base
        if output_size is None:
            return base.output_padding
        return base._output_padding(x, output_size, base.stride, base.padding, base.kernel_size, self._spatial_dims, base.dilation)

    def extra_repr(self) -> str:
        return (f"tasks={len(self.experts)}, rank={self.rank}, alpha={self.alpha:g}, layout={self.layout!r}, "
                f"infer_layout={self.infer_layout!r}")


class TaskBatchNorm(nn.Module):
    """One BatchNorm per task: each task's rows are normalised with that task's own batch
    statistics, running statistics and affine parameters, so no information crosses tasks.

    Args:
        norm: the BatchNorm to copy (``nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``).
        num_tasks: ``T`` copies are made.

    Trade-off: each task's statistics come from its share of the batch only (noisier with
    many tasks and small batches), in exchange for exact gradient separation. A task present
    with one row at a layer without spatial extent is normalised with its running statistics,
    or, without running statistics, maps to the norm's bias (see ``_normalise``).
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, num_tasks: int, name: str = "") -> None:
        super().__init__()
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(num_tasks))
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        routing = active_routing(self.name or "TaskBatchNorm")
        outs = [self._normalise(self.norms[seg.task], rows) for seg, rows in routing.split(x)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def _normalise(norm: nn.Module, rows: Tensor) -> Tensor:
        """``norm(rows)``. A task with a single value per channel (one row, no spatial extent)
        where batch statistics are used has none that PyTorch accepts: with running statistics it
        is normalised with them (left unchanged); without (``track_running_stats=False``) with
        its own one-value statistics (mean = the value, variance 0), as the BatchNorm formula
        gives: the output is the norm's bias."""
        if rows.numel() != rows.shape[1] or not (norm.training or norm.running_mean is None):
            return norm(rows)
        if norm.running_mean is not None:
            return F.batch_norm(rows, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        normalised = (rows - rows) * torch.rsqrt(rows.new_tensor(norm.eps))
        if norm.affine:
            shape = (1, -1) + (1,) * (rows.dim() - 2)
            normalised = normalised * norm.weight.view(shape) + norm.bias.view(shape)
        return normalised

    def extract(self, task: int) -> nn.Module:
        """A copy of task ``task``'s BatchNorm."""
        return copy.deepcopy(self.norms[task])
