"""Choose each expert layer's layout from measured cost on the machine at hand.

``tune_layouts(student, x, task_ids)`` runs one routed forward pass to capture every expert
layer's input, then times forward + backward of each layer alone in each candidate layout
and keeps the fastest (``inference=True``: the forward without gradients, kept separately). Layouts are exact alternatives (same values and gradients), so tuning
changes speed and memory only. In training, a layout is only chosen where the tensors it keeps
for backward stay within ``max_memory`` times those of the plain layer (``merged`` keeps one
weight per task present, ``stacked`` the ``P r`` extra channels).
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


def tune_layouts(student, x: Any, task_ids: Tensor, repeats: int = 3, inference: bool = False,
                 max_memory: float | None = 1.2, margin: float = 0.1) -> dict[str, dict[str, float]]:
    """Set every expert layer's layout to its fastest candidate for batches like ``x``.

    Args:
        student: an :class:`~lorkd.experts.ExpertModel`.
        x, task_ids: a representative batch (same sizes and task mix as training or inference).
        repeats: timed repetitions per candidate (median kept), after one warm-up.
        inference: ``False``: time forward + backward and set ``layer.layout`` (used while
            gradients are enabled); ``True``: time the forward without gradients and set
            ``layer.infer_layout`` (used under ``torch.no_grad()``).
        max_memory: in training, only layouts whose tensors kept for backward (parameters
            aside) are at most this multiple of what the plain layer keeps are chosen (the
            least memory if none is); ``None``: the fastest whatever its memory.
        margin: the ``layout="auto"`` rule's choice is kept unless another candidate is at
            least this fraction faster (timings on a loaded machine are noisy).

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
        candidates = [layout for layout in CANDIDATES if _worth_trying(layer, layout, inputs, routing, inference)]
        times, kept = _time_candidates(layer, attr, candidates, inputs, routing, repeats, inference)
        within = list(times)
        if not inference and max_memory is not None:
            budget = max_memory * _kept_bytes(lambda: layer.base(inputs.detach().requires_grad_(True)), layer)
            within = [layout for layout in times if kept[layout] <= budget]
        best = min(within, key=times.get) if within else min(kept, key=kept.get)
        setattr(layer, attr, "auto")
        with torch.set_grad_enabled(not inference):
            default = layer.resolve_layout(len(routing.segments), inputs)
        if default in within and times[best] > (1 - margin) * times[default]:
            best = default  # not clearly faster than the auto rule's choice: timing noise
        setattr(layer, attr, best)
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
    """Skip candidates that would run another candidate's code."""
    if layout == "stacked" and layer._kind != "conv":
        return False
    if layout == "fused":
        return not inference and fused_supported(layer.base)
    return True


def _kept_bytes(fn, layer: ExpertLayer) -> int:
    """Bytes of the storages autograd keeps for backward while ``fn()`` runs, the layer's
    parameters aside (views of one storage count once)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _time_candidates(layer: ExpertLayer, attr: str, candidates: list[str], x: Tensor, routing, repeats: int,
                     inference: bool) -> tuple[dict[str, float], dict[str, int]]:
    """``({layout: median ms}, {layout: bytes kept for backward})``. The candidates are timed in
    turn, one call each per round (after one warm-up round), so that load from other processes
    drifting over the tuning hits them alike."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:  # autograd.grad, not backward: no .grad of the model is touched
        inp = x.detach().requires_grad_(True)
        with routing_scope(routing):
            out = layer(inp)
        torch.autograd.grad(out, [inp, *params], torch.ones_like(out), allow_unused=True)

    def forward() -> None:
        with torch.no_grad(), routing_scope(routing):
            layer(x)

    run = forward if inference else step
    kept, samples = {}, {layout: [] for layout in candidates}
    for layout in candidates:  # warm-up round, which also measures memory
        setattr(layer, attr, layout)
        kept[layout] = 0 if inference else _kept_bytes(step, layer)
        if inference:
            run()
    for _ in range(repeats):
        for layout in candidates:
            setattr(layer, attr, layout)
            samples[layout].append(median_ms(run, 1, warmup=0, cuda=x.is_cuda))
    return {layout: statistics.median(t) for layout, t in samples.items()}, kept


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
