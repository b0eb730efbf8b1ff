"""Gradient separation through the optimiser: absent tasks' rows stay bit-identical.

The factors of all tasks live in one parameter per layer (``A [T, r, d1]``, ``B [T, d0, r]``;
per-task norms ``[T, C]``). A task absent from a batch gets exactly zero gradient on its rows,
but an optimiser would still move them (weight decay, momentum, Adam's running moments). So
:func:`keep_absent_experts` hooks the optimiser: before each step it keeps a copy of every task
parameter and of its optimiser state, and after the step it puts back the rows of the tasks
that no forward with gradients routed since the previous step. The result is what separate
per-task parameters with ``grad=None`` gave: an absent expert, its momentum and its Adam moments
are untouched. (One difference: Adam's bias correction counts optimiser steps per parameter,
so a task's correction uses the layer's step count rather than the number of steps it took
part in; with every task in most batches the two agree.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .model import ExpertModel


def keep_absent_experts(optimizer: torch.optim.Optimizer, model: nn.Module,
                        reduce: Callable[[Tensor], Tensor] | None = None):
    """Make ``optimizer.step()`` leave the task rows of absent tasks bit-identical.

    Args:
        optimizer: any ``torch.optim`` optimiser over (some of) ``model``'s parameters.
        model: a module holding one or more :class:`ExpertModel` (or one itself).
        reduce: combines the per-process ``tasks_seen`` flags (an ``int64 [T]`` tensor, 0/1) over
            processes before the step (e.g. an all-reduce with ``MAX``); ``None`` in one process.

    Returns:
        a handle whose ``remove()`` takes the hooks off.

    Raises:
        ValueError: ``model`` holds no ``ExpertModel``.
    """
    students = [m for m in model.modules() if isinstance(m, ExpertModel)]
    if not students:
        raise ValueError(f"keep_absent_experts: {type(model).__name__} holds no ExpertModel (no task parameters)")
    owners = {id(p): s for s in students for p in s.task_parameters()}
    saved: list[tuple[Tensor, Tensor, list[tuple[str, Tensor | None]], Tensor]] = []

    def tracked() -> list[Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"] if id(p) in owners]

    def seen_of(student: ExpertModel) -> Tensor:
        flags = student.tasks_seen.long()  # on the model's device (a buffer)
        return reduce(flags) > 0 if reduce is not None else flags > 0

    def before(opt, args, kwargs) -> None:
        saved.clear()
        masks = {id(s): seen_of(s) for s in students}
        for p in tracked():
            state = optimizer.state.get(p, {})
            keep = [(k, v.detach().clone() if _is_row_state(v, p) else None) for k, v in state.items()]
            saved.append((p, p.detach().clone(), keep, masks[id(owners[id(p)])]))

    def after(opt, args, kwargs) -> None:
        with torch.no_grad():
            for p, value, keep, seen in saved:
                rows = seen.view(-1, *([1] * (p.dim() - 1))).to(p.device)
                p.copy_(torch.where(rows, p, value))
                state = optimizer.state.get(p, {})
                old = dict(keep)
                for key, new in state.items():
                    if _is_row_state(new, p):  # state created by this step starts from zero on absent rows
                        before_step = old.get(key)
                        new.copy_(torch.where(rows, new, torch.zeros_like(new) if before_step is None else before_step))
        saved.clear()
        for s in students:
            s.reset_seen()

    return _Handles(optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after))


def _is_row_state(value, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.shape == param.shape


class _Handles:
    def __init__(self, *handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
