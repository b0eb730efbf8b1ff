"""Choose each expert layer's layout from measured cost on the machine at hand.

``tune_layouts(student, x, task_ids)`` runs one routed forward pass to capture every expert
layer's input, then times forward + backward of each layer alone in each candidate layout
and keeps the fastest (``inference=True``: the forward without gradients, kept separately). Layouts are exact alternatives (same values and gradients), so tuning
changes speed and memory only. The ``merged`` layout keeps one weight per task present for
the backward pass; it is only a candidate where that costs no more than the layer's output.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor

from .fused import fused_supported
from .layers import ExpertLayer
from .routing import route, routing_scope

CANDIDATES = ("stacked", "lowrank", "merged", "fused")


def tune_layouts(student, x: Any, task_ids: Tensor, repeats: int = 3, inference: bool = False) -> dict[str, dict[str, float]]:
    """Set every expert layer's layout to its fastest candidate for batches like ``x``.

    Args:
        student: an :class:`~lorkd.experts.ExpertModel`.
        x, task_ids: a representative batch (same sizes and task mix as training or inference).
        repeats: timed repetitions per candidate (median kept), after one warm-up.
        inference: ``False``: time forward + backward and set ``layer.layout`` (used while
            gradients are enabled); ``True``: time the forward without gradients and set
            ``layer.infer_layout`` (used under ``torch.no_grad()``).

    Returns:
        ``{layer name: {layout: milliseconds}}`` of the candidates measured; the chosen layout
        is stored on each layer (saved by ``save_student``). A batch of one task
        is skipped (``{}``, layouts unchanged): every layout then runs the merged path. Every
        buffer (BatchNorm running statistics, ``num_batches_tracked``) and every ``.grad`` is
        left as it was.
    """
    routing = route(task_ids, _rows(x), student.num_tasks)
    if len(routing.segments) == 1:
        return {}  # one task: every layout runs the merged path, so there is nothing to choose
    buffers = [(b, b.detach().clone()) for b in student.buffers()]
    captured: dict[str, Tensor] = {}
    hooks = [layer.register_forward_pre_hook(_capture(name, captured)) for name, layer in student.expert_layers()]
    try:
        with torch.no_grad():
            student(x, task_ids)
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():  # the capture ran in the model's mode: put running statistics etc. back
            for buffer, saved in buffers:
                buffer.copy_(saved)
    first = next(iter(captured.values()))
    routing = route(task_ids, routing.batch_size, student.num_tasks, first.device)
    attr = "infer_layout" if inference else "layout"
    timings = {}
    for name, layer in student.expert_layers():
        inputs = captured[name]
        times = {}
        for layout in CANDIDATES:
            if not _worth_trying(layer, layout, inputs, routing, inference):
                continue
            setattr(layer, attr, layout)
            times[layout] = _time_layer(layer, inputs, routing, repeats, inference)
        setattr(layer, attr, min(times, key=times.get))
        timings[name] = times
    return timings


def _rows(x: Any) -> int:
    from .model import _batch_size_and_device

    return _batch_size_and_device(x)[0]


def _capture(name: str, store: dict[str, Tensor]):
    def hook(module, args):
        store[name] = args[0].detach().clone()
    return hook


def _worth_trying(layer: ExpertLayer, layout: str, x: Tensor, routing, inference: bool) -> bool:
    """Skip candidates that would run another candidate's code, and ``merged`` in training where
    the per-task weights it keeps for backward would outweigh the layer's output."""
    if layout == "stacked" and layer._kind != "conv":
        return False
    if layout == "fused":
        return not inference and fused_supported(layer.base)
    if layout == "merged" and not inference:
        with torch.no_grad(), routing_scope(routing):
            out_numel = layer.base(x).numel() if layer._kind != "conv_transpose" else x.numel()
        return len(routing.segments) * layer.base.weight.numel() <= out_numel
    return True


def _time_layer(layer: ExpertLayer, x: Tensor, routing, repeats: int, inference: bool) -> float:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:  # autograd.grad, not backward: no .grad of the model is touched
        inp = x.detach().requires_grad_(True)
        with routing_scope(routing):
            out = layer(inp)
        torch.autograd.grad(out, [inp, *params], torch.ones_like(out), allow_unused=True)

    def forward() -> None:
        with torch.no_grad(), routing_scope(routing):
            layer(x)

    return median_ms(forward if inference else step, repeats, warmup=1, cuda=x.is_cuda)


def median_ms(step, repeats: int, warmup: int = 1, cuda: bool = False) -> float:
    """Median wall time of ``step()`` in milliseconds over ``repeats`` calls after ``warmup``
    calls (synchronising the GPU around each timed call when ``cuda``)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
