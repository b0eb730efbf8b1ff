"""The ``fused`` layout: merged-weight forward, full-batch backward (one custom autograd function).

Forward: per task segment, the plain layer with its merged weight ``W_t = W + s B_t A_t`` (as
the ``merged`` layout). Nothing per task is kept for backward: only ``x``, ``W`` and the factors,
as the plain layer keeps ``x`` and ``W``. Backward splits ``W_t`` back into its two parts:

* the shared part, once on the full batch: ``grad_x = dL/dx`` through ``W`` and ``grad_W`` in one
  call of the plain layer's backward (the weight gradient is computed once, not per task);
* per task, the low-rank part through thin layers: ``u = A_t x`` and ``h = B_t^T g`` (``r``
  channels), ``grad_B_t = s g u^T``, ``grad_A_t = s h x^T`` and ``grad_x += s A_t^T h``.

The values and gradients are those of the other layouts (the maths is linear in ``W_t``). Only
``groups == 1`` layers with zero padding given as numbers use it; others use ``merged``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_conv_backward = torch.ops.aten.convolution_backward


def fused_supported(base: nn.Module) -> bool:
    """``True`` where :func:`fused_forward` is exact: Linear, or a convolution with ``groups == 1``,
    ``padding_mode == "zeros"`` and numeric padding."""
    if isinstance(base, nn.Linear):
        return True
    return base.groups == 1 and base.padding_mode == "zeros" and not isinstance(base.padding, str)


def fused_forward(layer, x: Tensor, routing, output_padding) -> Tensor:
    """``layer`` (an ``ExpertLayer``) on ``x`` ``[k * B, ...]`` (rows sorted by task) in the fused layout."""
    factors = [p for t in routing.tasks for p in (layer.experts[t].A, layer.experts[t].B)]
    return _Fused.apply(layer, routing, output_padding, x, layer.base.weight, layer.base.bias, *factors)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, routing, output_padding, x, weight, bias, *factors):
        k = routing.rows_per_sample(x)
        ctx.layer, ctx.output_padding, ctx.has_bias = layer, output_padding, bias is not None
        ctx.lengths = [k * s.length for s in routing.segments]
        outs = [layer._plain(rows, weight + layer.scale * (b @ a).view_as(weight), None, output_padding)
                for rows, a, b in zip(x.split(ctx.lengths), factors[0::2], factors[1::2])]
        ctx.save_for_backward(x, weight, *factors)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, weight, *factors = ctx.saved_tensors
        layer, s = ctx.layer, ctx.layer.scale
        need_x, need_w, need_b = ctx.needs_input_grad[3:6]
        gx, gw, gb = _shared_backward(layer, g, x, weight, ctx.output_padding, (need_x, need_w, need_b and ctx.has_bias))
        grads = []
        parts = gx.split(ctx.lengths) if need_x else [None] * len(ctx.lengths)
        for rows, g_rows, gx_rows, a, b in zip(x.split(ctx.lengths), g.split(ctx.lengths), parts, factors[0::2], factors[1::2]):
            ga, gb_t, gx_extra = _lowrank_backward(layer, g_rows, rows, a, b, ctx.output_padding, need_x)
            grads += [ga.mul_(s), gb_t.mul_(s)]
            if need_x:
                gx_rows.add_(gx_extra, alpha=s)
        return (None, None, None, gx, gw, gb, *grads)


def _shared_backward(layer, g: Tensor, x: Tensor, weight: Tensor, output_padding, mask):
    """``(grad_x, grad_W, grad_bias)`` of the plain layer with ``W`` on the full batch (one call)."""
    base = layer.base
    if layer._kind == "linear":
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return (g @ weight if mask[0] else None, g2.t() @ x2 if mask[1] else None, g2.sum(0) if mask[2] else None)
    gx, gw, gb = _conv_backward(g, x, weight, [weight.shape[1] if layer._kind == "conv_transpose" else weight.shape[0]],
                                base.stride, base.padding, base.dilation, layer._kind == "conv_transpose",
                                output_padding or (0,) * layer._spatial_dims, 1, list(mask))
    return gx, gw, gb


def _lowrank_backward(layer, g: Tensor, x: Tensor, a: Tensor, b: Tensor, output_padding, need_x: bool):
    """Unscaled ``(grad_A, grad_B, grad_x)`` of the branch ``(B A) x`` for one task's rows."""
    base, r, n = layer.base, layer.rank, layer._spatial_dims
    if layer._kind == "linear":
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        u, h = x2 @ a.t(), g2 @ b  # [m, r]
        return h.t() @ x2, g2.t() @ u, (h @ a).view_as(x) if need_x else None
    ones = (1,) * n
    if layer._kind == "conv":
        a_conv = a.view(r, base.in_channels, *base.weight.shape[2:])
        u = torch.ops.aten.convolution(x, a_conv, None, base.stride, base.padding, base.dilation, False, (0,) * n, 1)
        h = torch.ops.aten.convolution(g, b.t().reshape(r, -1, *ones), None, ones, (0,) * n, ones, False, (0,) * n, 1)
        gx, ga, _ = _conv_backward(h, x, a_conv, None, base.stride, base.padding, base.dilation, False, (0,) * n, 1,
                                   [need_x, True, False])
        gb = torch.einsum("nol,nrl->or", g.flatten(2), u.flatten(2))
        return ga.reshape(r, -1), gb, gx
    # transposed: W [in, out, *k] = B [in, r] @ A [r, out * k]; branch = convT(B^T x, A)
    a_conv = a.view(r, base.out_channels, *base.weight.shape[2:])
    v = torch.ops.aten.convolution(x, b.t().reshape(r, -1, *ones), None, ones, (0,) * n, ones, False, (0,) * n, 1)
    gv, ga, _ = _conv_backward(g, v, a_conv, None, base.stride, base.padding, base.dilation, True,
                               output_padding or (0,) * n, 1, [True, True, False])
    gb = torch.einsum("nil,nrl->ir", x.flatten(2), gv.flatten(2))
    gx = torch.einsum("ir,nrl->nil", b, gv.flatten(2)).view_as(x) if need_x else None
    return ga.reshape(r, -1), gb, gx
