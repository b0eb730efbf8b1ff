"""``add_experts`` and the student it returns: one model, one low-rank expert per task."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .inject import RankSpec, Skipped, Target, inject, validate_rank
from .layers import LAYOUTS, ExpertLayer, TaskBatchNorm
from .routing import route, routing_scope

NORMS = ("shared", "per_task")


def add_experts(
    model: nn.Module,
    num_tasks: int,
    rank: RankSpec = 4,
    alpha: float = 16.0,
    targets: Sequence[Target] | None = None,
    norm: str = "shared",
    layout: str = "auto",
) -> "ExpertModel":
    """Give a copy of ``model`` one low-rank expert per task on its Linear/Conv layers.

    Args:
        model: any ``nn.Module`` whose forward takes a batch as its first argument; it is
            deep-copied, never modified.
        num_tasks: ``T >= 1``.
        rank: an int, or ``{name_pattern: rank}`` (fnmatch on qualified module names, first
            match wins; e.g. ``{"decoder.*": 8, "*": 4}``).
        alpha: each expert is scaled by ``alpha / rank``.
        targets: ``None`` for every eligible layer, or a list of name patterns and/or module
            types. Targeted layers that cannot take an expert are listed in ``summary()``.
        norm: ``"shared"`` keeps BatchNorm shared (its batch statistics mix tasks, so a task's
            loss reaches other experts through them); ``"per_task"`` gives each task its own
            BatchNorm, which makes gradient separation exact.
        layout: ``"auto"`` (default), ``"lowrank"`` or ``"merged"``; see :mod:`lorkd.experts.layers`.

    Returns:
        an :class:`ExpertModel`; call it as ``student(x, task_ids)``.

    Raises:
        ValueError: ``num_tasks < 1``, a rank below 1, ``alpha <= 0``, an unknown ``norm`` or
            ``layout``, no eligible layer among the targets, or ``model`` already has experts.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
    validate_rank(rank)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    nested = next((n for n, m in model.named_modules() if isinstance(m, (ExpertModel, ExpertLayer, TaskBatchNorm))), None)
    if nested is not None:
        raise ValueError(f"{type(model).__name__} already has experts (at {nested or 'its root'!r}); "
                         "add_experts on it would wrap the expert layers' inner layers again: train it as "
                         "it is, or pass student.extract(t) (a plain model) to start from one task's weights")
    inner = copy.deepcopy(model)
    inner, layers, skipped = inject(inner, num_tasks, rank, alpha, targets, norm, layout)
    if not layers:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) or "the model has no Linear/Conv layer"
        raise ValueError(f"no eligible layer to add experts to in {type(model).__name__} (targets={targets!r}): {why}")
    config = ExpertConfig(num_tasks, rank, float(alpha), None if targets is None else list(targets), norm, layout)
    return ExpertModel(inner, config, skipped)


@dataclass
class ExpertConfig:
    """What ``add_experts`` was called with (targets given as types are kept by name when saved)."""

    num_tasks: int
    rank: RankSpec
    alpha: float
    targets: list[Target] | None
    norm: str
    layout: str = "auto"

    def to_json(self) -> dict[str, Any]:
        targets = None if self.targets is None else [
            t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}" for t in self.targets
        ]
        rank = dict(self.rank) if isinstance(self.rank, dict) else self.rank
        return {"num_tasks": self.num_tasks, "rank": rank, "alpha": self.alpha, "targets": targets,
                "norm": self.norm, "layout": self.layout}


class ExpertModel(nn.Module):
    """A model with one low-rank expert per task on its layers (built by :func:`add_experts`).

    ``forward(x, task_ids, *args, **kwargs)`` runs the wrapped model once on the mixed batch:
    ``x`` is a tensor ``[B, ...]`` (or a tuple/list/dict of them), ``task_ids`` a LongTensor
    ``[B]`` in any order or an ``int`` for the whole batch. Rows are never reordered: the output
    is ``model(x, *args, **kwargs)`` computed with each row's own expert.

    Soft routing: ``task_ids`` may instead be a float tensor of mixture weights ``[B, T]`` (finite,
    non-negative, rows summing to 1; :func:`~lorkd.experts.routing.check_weights` raises
    ``ValueError`` naming the problem otherwise). Row ``i`` then runs with
    ``W + sum_t w[i, t] (alpha / r) B_t A_t`` on every layer with experts; the weights receive
    gradients, so a router producing them trains through the task losses. One-hot weights give
    the values of hard ids (which remain the faster path). Per-task norms normalise each row as
    a row of its top task (see :class:`~lorkd.experts.layers.TaskBatchNorm`).

    Parameters: the wrapped model's own (shared) parameters, and per layer the stacked factors
    ``A [T, r, d1]``, ``B [T, d0, r]`` (and with ``norm="per_task"`` each norm's ``[T, C]``
    affine parameters) whose row ``t`` belongs to task ``t`` (:meth:`task_parameters`). A task
    absent from a batch gets exactly zero gradient on its rows; :func:`keep_absent_experts`
    makes an optimiser leave those rows (and their optimiser state) bit-identical.
    """

    def __init__(self, model: nn.Module, config: ExpertConfig, skipped: list[Skipped] | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.skipped = list(skipped or [])
        # BoolTensor [T]: tasks routed with gradients since reset_seen() (not saved; moves with .to())
        self.register_buffer("tasks_seen", torch.zeros(config.num_tasks, dtype=torch.bool), persistent=False)

    @property
    def num_tasks(self) -> int:
        return self.config.num_tasks

    # ------------------------------------------------------------------ forward
    def forward(self, x: Any, task_ids: Tensor | int, *args: Any, **kwargs: Any) -> Any:
        batch, device = _batch_size_and_device(x)
        routing = route(task_ids, batch, self.num_tasks, device)
        if torch.is_grad_enabled():
            self.tasks_seen.logical_or_(routing.present().to(self.tasks_seen.device))
        with routing_scope(routing):
            return self.model(x, *args, **kwargs)

    def reset_seen(self) -> None:
        """Forget which tasks were routed (called by :func:`keep_absent_experts` after each step)."""
        self.tasks_seen.zero_()

    # ------------------------------------------------------------------ parts
    def expert_layers(self) -> Iterator[tuple[str, ExpertLayer]]:
        """``(name, layer)`` for every layer with experts (names relative to the wrapped model)."""
        for name, module in self.model.named_modules():
            if isinstance(module, ExpertLayer):
                yield name, module

    def named_task_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter whose dim 0 is the task: the stacked factors
        and, with ``norm="per_task"``, the norms' affine parameters."""
        for name, module in self.named_modules():
            if isinstance(module, (ExpertLayer, TaskBatchNorm)):
                keys = ("A", "B") if isinstance(module, ExpertLayer) else ("weight", "bias")
                for key in keys:
                    param = getattr(module, key)
                    if param is not None:
                        yield f"{name}.{key}", param

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters whose row ``t`` belongs to task ``t`` (see :meth:`named_task_parameters`)."""
        return (p for _, p in self.named_task_parameters())

    def named_expert_parameters(self, task: int) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` owned by task ``task`` alone: views of row ``task`` of each task
        parameter, named as per-task parameters (``layer.experts.{t}.A``, ``norm.norms.{t}.weight``).

        Raises:
            ValueError: ``task`` is not in ``[0, num_tasks)``.
        """
        self._check_task(task)
        for name, param in self.named_task_parameters():
            owner, _, key = name.rpartition(".")
            container = "experts" if key in ("A", "B") else "norms"
            yield f"{owner}.{container}.{task}.{key}", param[task]

    def expert_parameters(self, task: int) -> Iterator[Tensor]:
        """Views of the parameters owned by task ``task`` alone (see :meth:`named_expert_parameters`)."""
        return (p for _, p in self.named_expert_parameters(task))

    def named_expert_gradients(self, task: int) -> Iterator[tuple[str, Tensor | None]]:
        """``(name, gradient)`` of task ``task``'s rows (``None`` where the whole parameter got no
        gradient), named as :meth:`named_expert_parameters`."""
        for (name, _), param in zip(self.named_expert_parameters(task), self.task_parameters()):
            yield name, None if param.grad is None else param.grad[task]

    def expert_gradients(self, task: int) -> Iterator[Tensor | None]:
        """The gradients of task ``task``'s rows (see :meth:`named_expert_gradients`)."""
        return (g for _, g in self.named_expert_gradients(task))

    def named_shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` that hold no task's rows (the base weights, shared norms, ...)."""
        owned = {id(p) for p in self.task_parameters()}
        return ((n, p) for n, p in self.named_parameters() if id(p) not in owned)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not a task parameter; the two partition ``parameters()``."""
        return (p for _, p in self.named_shared_parameters())

    # ------------------------------------------------------------------ extraction
    def extract(self, task: int) -> nn.Module:
        """A plain copy of the wrapped model with expert ``task`` merged into its weights.

        The result has the wrapped model's own class, holds no lorkd module, has the original
        parameter count, and in eval mode reproduces ``self(x, task)``. It is in the same
        train/eval mode as this model.

        Raises:
            ValueError: ``task`` is not in ``[0, num_tasks)``.
        """
        self._check_task(task)
        if isinstance(self.model, ExpertLayer):  # the wrapped model was one bare layer
            return self.model.extract(task)
        plain = copy.deepcopy(self.model)
        for name, module in list(plain.named_modules()):
            if isinstance(module, (ExpertLayer, TaskBatchNorm)):
                parent_name, _, child = name.rpartition(".")
                parent = plain.get_submodule(parent_name) if parent_name else plain
                setattr(parent, child, module.extract(task))
        return plain

    def _check_task(self, task: int) -> None:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task id {task!r} is out of range: this model has experts for tasks 0..{self.num_tasks - 1}")

    # ------------------------------------------------------------------ reporting
    def summary(self) -> "ExpertSummary":
        """Layers with experts (rank, parameters per task), skipped layers and totals."""
        rows = [
            LayerRow(name, type(layer.base).__name__, tuple(layer.base.weight.shape), layer.rank,
                     layer.A[0].numel() + layer.B[0].numel(), layer.layout)
            for name, layer in self.expert_layers()
        ]
        per_task = sum(p.numel() for p in self.expert_parameters(0))
        shared = sum(p.numel() for p in self.shared_parameters())
        return ExpertSummary(rows, list(self.skipped), self.num_tasks, shared, per_task, self.config.norm)


@dataclass
class LayerRow:
    name: str
    type: str
    weight_shape: tuple[int, ...]
    rank: int
    params_per_task: int
    layout: str


@dataclass
class ExpertSummary:
    """What :meth:`ExpertModel.summary` reports; ``str()`` renders it as a table (``extra``: more
    ``key: value`` lines, e.g. a multi-task student's tasks and heads)."""

    layers: list[LayerRow]
    skipped: list[Skipped]
    num_tasks: int
    shared_params: int
    params_per_task: int
    norm: str
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'type':<16} {'weight':<20} {'rank':>4} {'params/task':>11}"]
        for r in self.layers:
            shape = "x".join(map(str, r.weight_shape))
            lines.append(f"{r.name:<{width}}  {r.type:<16} {shape:<20} {r.rank:>4} {r.params_per_task:>11,}")
        lines.append(
            f"{len(self.layers)} layers with experts; tasks: {self.num_tasks}; norm: {self.norm}; "
            f"shared parameters: {self.shared_params:,}; per task: {self.params_per_task:,} "
            f"({100 * self.params_per_task / max(self.shared_params, 1):.2f}% of shared)"
        )
        for s in self.skipped:
            lines.append(f"skipped {s.name} ({s.type}): {s.reason}")
        lines.extend(f"{key}: {value}" for key, value in self.extra.items())
        return "\n".join(lines)


def _batch_size_and_device(x: Any) -> tuple[int, torch.device]:
    """The number of rows and the device of the first tensor found in ``x``."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("the model input must have a batch dimension, got a 0-d tensor")
        return x.shape[0], x.device
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for value in values:
        try:
            return _batch_size_and_device(value)
        except ValueError:
            continue
    raise ValueError(f"cannot find a batch tensor in the model input of type {type(x).__name__}")
