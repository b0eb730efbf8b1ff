"""MoLA-Router: route samples to experts without a task id.

A :class:`TaskRouter` is a small convolutional network on the input that gives per-sample logits
over the ``T`` experts and a projection for the task-wise decorrelation loss
(:func:`lorkd.distill.twd_loss`). A :class:`RoutedStudent` puts it in front of a student (an
:class:`~lorkd.experts.ExpertModel`, or a :class:`~lorkd.models.multitask.MultiTaskNet` with
experts): without task ids, each sample runs with ``softmax(logits / temperature)`` as its
mixture weights over the experts (soft routing), or with the top-``k`` of them renormalised, or
(``top_k=1``) through its argmax expert alone as hard ids (the fast path). With task ids it runs
the student with them (the router still runs, so its losses can be computed on the same batch).

Gradients: with soft routing (``top_k`` ``None`` or ``> 1``) the task losses reach the router
through the mixture weights; with ``top_k=1`` they do not (the argmax is piecewise constant), and
the router learns from its own losses only (TwD, cross-entropy on the task id).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DataError
from ..experts.io import load_expert
from ..experts.routing import top_k_weights
from ..fileio import read_json

ROUTED_CARD = "routed.json"

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


@dataclass
class RouterOutput:
    """What a :class:`TaskRouter` returns for ``B`` samples.

    Attributes:
        logits: ``[B, T]`` routing logits.
        projection: ``[B, P]`` the projected features that TwD contrasts (not normalised).
    """

    logits: Tensor
    projection: Tensor


class TaskRouter(nn.Module):
    """A few strided convolutions (conv 3 - BatchNorm - ReLU, stride 2), global average pooling,
    then a linear head to ``[B, T]`` logits and a two-layer projection head to ``[B, P]``.

    Args:
        in_channels: channels of the input images/volumes.
        num_tasks: ``T``, the number of experts to route over.
        spatial_dims: 1, 2 or 3.
        channels: output channels of each convolution (one stride-2 stage each); at least one.
        projection_dim: ``P``.

    Shapes: ``x [B, in_channels, *spatial]`` (``spatial_dims`` sizes) -> :class:`RouterOutput`.

    Raises:
        ValueError: ``spatial_dims`` not in 1..3, ``num_tasks``/``in_channels``/``projection_dim`` below
            1, an empty ``channels`` or a channel count below 1; in ``forward``, an input whose
            shape is not ``[B, in_channels, *spatial]`` (the message names the expected shape).
    """

    def __init__(self, in_channels: int, num_tasks: int, spatial_dims: int = 2,
                 channels: Sequence[int] = (16, 32, 64), projection_dim: int = 32) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("num_tasks", num_tasks), ("projection_dim", projection_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        channels = list(channels)
        if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of integers >= 1, got {channels!r}")
        self.in_channels, self.num_tasks, self.spatial_dims = in_channels, num_tasks, spatial_dims
        self.channels, self.projection_dim = channels, projection_dim
        stages, previous = [], in_channels
        for c in channels:
            stages += [_CONV[spatial_dims](previous, c, 3, stride=2, padding=1, bias=False), _NORM[spatial_dims](c),
                       nn.ReLU(inplace=True)]
            previous = c
        self.features = nn.Sequential(*stages, _POOL[spatial_dims](1), nn.Flatten())
        self.head = nn.Linear(previous, num_tasks)
        self.projector = nn.Sequential(nn.Linear(previous, previous), nn.ReLU(inplace=True), nn.Linear(previous, projection_dim))

    def forward(self, x: Tensor) -> RouterOutput:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            dims = ", ".join(["B", str(self.in_channels)] + ["*"] * self.spatial_dims)
            raise ValueError(f"TaskRouter expects input [{dims}], got {list(x.shape)}")
        h = self.features(x)
        return RouterOutput(self.head(h), self.projector(h))

    def plain(self) -> tuple[nn.Sequential, dict[str, Any]]:
        """The router as exported: :func:`plain_router` (features and logit head, no projection)
        with these weights, and its architecture spec. A copy: later training does not change it."""
        spec = {"factory": "lorkd.models.router.plain_router",
                "kwargs": {"in_channels": self.in_channels, "num_tasks": self.num_tasks,
                           "spatial_dims": self.spatial_dims, "channels": list(self.channels)}}
        plain = plain_router(**spec["kwargs"])
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("projector.")}
        plain.load_state_dict(state, strict=True)
        return plain.train(self.training), spec


def plain_router(in_channels: int, num_tasks: int, spatial_dims: int = 2,
                 channels: Sequence[int] = (16, 32, 64)) -> nn.Sequential:
    """The exported router: ``nn.Sequential(OrderedDict(features=..., head=nn.Linear))`` of a
    :class:`TaskRouter` (the same state-dict keys, without ``projector.*``); ``x [B, C, *spatial] ->
    logits [B, T]``, the routed task is their argmax. Raises what :class:`TaskRouter` raises."""
    router = TaskRouter(in_channels, num_tasks, spatial_dims, channels)
    return nn.Sequential(OrderedDict(features=router.features, head=router.head))


def routing_weights(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """``[B, T]`` mixture weights from router logits ``[B, T]``: ``softmax(logits / temperature)``,
    then the ``top_k`` largest kept and renormalised when set (``top_k=1``: one-hot of the argmax)."""
    weights = torch.softmax(logits / temperature, dim=1)
    return weights if top_k is None else top_k_weights(weights, top_k)


def router_view(image: Tensor, size: Sequence[int]) -> Tensor:
    """What a segmentation router sees of one whole case: ``image [C, *spatial]`` (the volume as read,
    channels fitted to the router's) with each channel z-scored over the whole case (mean 0, std 1;
    a constant channel becomes 0), then resized to ``size`` (linear/bilinear/trilinear,
    ``align_corners=False``) -> float32 ``[C, *size]``. Independent of any task's preprocessing (the
    task is what the router is asked for); z-scoring makes it independent of the intensity scale.

    Raises:
        ValueError: ``size`` does not have one entry per spatial axis of ``image``.
    """
    if len(size) != image.dim() - 1 or image.dim() - 1 not in _CONV:
        raise ValueError(f"router input size {list(size)} needs one entry per spatial axis of the case "
                         f"{list(image.shape)} ([C, *spatial], 1 to 3 spatial axes)")
    x = image.float().reshape(image.shape[0], -1)
    x = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-8)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(x.reshape(image.shape)[None], size=tuple(int(s) for s in size), mode=mode,
                         align_corners=False)[0]


@dataclass
class Routed:
    """What a :class:`RoutedStudent` returns.

    Attributes:
        output: the student's output for the batch (the structure of ``student(x, ...)``).
        logits: ``[B, T]`` router logits.
        projection: ``[B, P]`` router projection (for TwD).
        routing: what the student was routed with: ``[B, T]`` float mixture weights, or ``[B]``
            int64 task ids (given by the caller, or the router's argmax with ``top_k=1``).
    """

    output: Any
    logits: Tensor
    projection: Tensor
    routing: Tensor

    @property
    def tasks(self) -> Tensor:
        """``[B]`` int64: each sample's routed task (the router's argmax)."""
        return self.logits.argmax(dim=1)


class RoutedStudent(nn.Module):
    """A router in front of a student: ``forward(x, task_ids=None) -> Routed``.

    Args:
        student: called as ``student(x, routing)`` with ``routing`` an int64 ``[B]`` of task ids or a
            float ``[B, T]`` of mixture weights (an :class:`~lorkd.experts.ExpertModel`, or a
            :class:`~lorkd.models.multitask.MultiTaskNet` with experts).
        router: a module ``x -> RouterOutput`` (e.g. :class:`TaskRouter`) with ``T`` logits.
        temperature: the softmax temperature of the routing weights (``> 0``).
        top_k: ``None`` (every expert, softmax weights), or ``k`` in ``[1, T]``: each row's ``k``
            largest weights renormalised; ``1`` routes each row by the router's argmax as a hard
            task id.

    Raises:
        ValueError: ``temperature <= 0``, or ``top_k`` not ``None`` nor an integer in ``[1, T]``
            (``T`` read from the student's ``num_tasks``).
    """

    def __init__(self, student: nn.Module, router: nn.Module, temperature: float = 1.0, top_k: int | None = None) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        num_tasks = getattr(student, "num_tasks", None)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or not 1 <= top_k <= (num_tasks or top_k)):
            raise ValueError(f"top_k must be None or an integer in [1, {num_tasks}], got {top_k!r}")
        self.student, self.router = student, router
        self.temperature, self.top_k = float(temperature), top_k

    @property
    def num_tasks(self) -> int:
        return self.student.num_tasks

    def routing_weights(self, logits: Tensor) -> Tensor:
        """``[B, T]`` mixture weights from router logits: ``softmax(logits / temperature)``, then the
        top-``k`` kept and renormalised when ``top_k`` is set (``top_k=1``: one-hot of the argmax)."""
        return routing_weights(logits, self.temperature, self.top_k)

    def forward(self, x: Tensor, task_ids: Tensor | None = None) -> Routed:
        """Route ``x [B, C, *spatial]`` and run the student.

        ``task_ids`` (int64 ``[B]``) overrides the router for the student (its logits and
        projection are still computed). Raises what the student and router raise.
        """
        out = self.router(x)
        if out.logits.shape != (x.shape[0], self.num_tasks):
            raise ValueError(f"the router gave logits of shape {list(out.logits.shape)}, "
                             f"expected [{x.shape[0]}, {self.num_tasks}]")
        if task_ids is not None:
            routing = task_ids
        elif self.top_k == 1:
            routing = out.logits.argmax(dim=1)
        else:
            routing = self.routing_weights(out.logits)
        return Routed(self.student(x, routing), out.logits, out.projection, routing)


class RoutedExperts(nn.Module):
    """What ``routed/`` holds, loaded: the exported router and one plain expert per task.

    ``forward(x [B, C, *spatial]) -> (tasks [B] int64, logits)``: each image goes to the task of
    its largest router logit, then through that task's expert; ``logits[i]`` is image ``i``'s
    ``[C_task]`` class logits (tasks have their own classes, so a list, not one tensor).

    Args:
        router: ``x -> [B, T]`` logits (e.g. :func:`plain_router`).
        experts: ``T`` plain models ``x -> [B, C_t]``, in task-id order.
        tasks: the ``T`` task names.
    """

    def __init__(self, router: nn.Module, experts: Sequence[nn.Module], tasks: Sequence[str]) -> None:
        super().__init__()
        if len(experts) != len(tasks):
            raise ValueError(f"{len(experts)} experts for {len(tasks)} task names")
        self.router, self.experts, self.tasks = router, nn.ModuleList(experts), list(tasks)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        tasks = self.router(x).argmax(dim=1)
        logits: list[Any] = [None] * x.shape[0]
        for task in torch.unique(tasks).tolist():
            rows = torch.nonzero(tasks == task).squeeze(1)
            for row, value in zip(rows.tolist(), self.experts[task](x.index_select(0, rows))):
                logits[row] = value
        return tasks, logits


def load_routed(folder: str | Path) -> RoutedExperts:
    """Load a ``routed/`` folder (``routed.json``, ``router/`` and ``experts/<task>/``, each a
    :func:`lorkd.save_expert` folder) as a :class:`RoutedExperts` in eval mode; its ``card`` is the
    ``routed.json`` dict.

    Raises:
        DataError: a missing or malformed file (names it), or what :func:`lorkd.load_expert` raises.
    """
    folder = Path(folder)
    card = read_json(folder / ROUTED_CARD)
    for key in ("tasks", "router", "experts"):
        if key not in card:
            raise DataError(f"{folder / ROUTED_CARD}: missing field {key!r}")
    missing = [t for t in card["tasks"] if t not in card["experts"]]
    if missing:
        raise DataError(f"{folder / ROUTED_CARD}: no expert folder for tasks {missing}")
    model = RoutedExperts(load_expert(folder / card["router"]),
                          [load_expert(folder / card["experts"][t]) for t in card["tasks"]], card["tasks"])
    model.card = card
    return model.eval()
