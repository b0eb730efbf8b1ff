"""Choosing the layers that get experts and swapping them in place inside a model."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from torch import nn

from .layers import ExpertLayer, TaskBatchNorm, ineligibility

Target = Union[str, type]
RankSpec = Union[int, Mapping[str, int]]


@dataclass(frozen=True)
class Skipped:
    """A targeted layer that got no expert, and why."""

    name: str
    type: str
    reason: str


MHA_REASON = ("its packed q/k/v input projection (in_proj_weight, or q/k/v_proj_weight) and out_proj are "
              "read as raw tensors by F.multi_head_attention_forward, so no expert can reach them; use an "
              "attention block built from nn.Linear layers (e.g. MONAI's SABlock) to give attention experts")


def validate_rank(rank: RankSpec) -> None:
    """Raise ``ValueError`` naming the bad rank (an int or a ``{pattern: int}`` mapping, each ``>= 1``)."""
    items = rank.items() if isinstance(rank, Mapping) else [("rank", rank)]
    for key, value in items:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rank for {key!r} must be an integer >= 1, got {value!r}")
    if isinstance(rank, Mapping) and not rank:
        raise ValueError("rank mapping is empty: give at least one {pattern: rank} entry, e.g. {'*': 4}")


def rank_for(name: str, rank: RankSpec) -> int | None:
    """The rank of layer ``name``: the int, or the first pattern in the mapping that matches."""
    if not isinstance(rank, Mapping):
        return rank
    return next((r for pattern, r in rank.items() if fnmatch.fnmatchcase(name, pattern)), None)


def is_targeted(name: str, module: nn.Module, targets: Sequence[Target] | None) -> bool:
    """``targets=None`` targets everything; else a name pattern (fnmatch) or a module type must match."""
    if targets is None:
        return True
    for target in targets:
        if isinstance(target, str) and fnmatch.fnmatchcase(name, target):
            return True
        if isinstance(target, type) and isinstance(module, target):
            return True
    return False


def inject(
    model: nn.Module,
    num_tasks: int,
    rank: RankSpec,
    alpha: float,
    targets: Sequence[Target] | None,
    norm: str,
    layout: str,
) -> tuple[nn.Module, dict[str, ExpertLayer], list[Skipped]]:
    """Replace targeted layers of ``model`` (in place) by :class:`ExpertLayer` and, when
    ``norm == "per_task"``, every BatchNorm by :class:`TaskBatchNorm`.

    Returns the model (a new root only when ``model`` is itself one eligible layer, which is
    then named ``""``), the expert layers by qualified name and the targeted layers skipped.
    """
    if not any(True for _ in model.children()) and ineligibility(model) is None:
        layer_rank = rank_for("", rank)
        if layer_rank is not None and is_targeted("", model, targets):
            root = ExpertLayer(model, num_tasks, layer_rank, alpha, layout, "")
            return root, {"": root}, []
    parents = {module: parent for parent in model.modules() for module in parent.children()}
    layers: dict[str, ExpertLayer] = {}
    skipped: list[Skipped] = []
    for name, module in list(model.named_modules()):
        if not name:
            continue  # the root model itself is never replaced
        if norm == "per_task" and isinstance(module, nn.modules.batchnorm._BatchNorm):
            _replace(model, name, TaskBatchNorm(module, num_tasks, name))
            continue
        if not is_targeted(name, module, targets):
            continue
        if isinstance(module, nn.MultiheadAttention):
            skipped.append(Skipped(name, type(module).__name__, MHA_REASON))
            continue
        reason = ineligibility(module)
        if reason is None and isinstance(parents.get(module), nn.MultiheadAttention):
            reason = "its weight is read directly by nn.MultiheadAttention, not through forward()"
        layer_rank = rank_for(name, rank)
        if reason is None and layer_rank is None:
            reason = "no rank pattern matched its name"
        if reason is not None:
            if targets is None and "is not a Linear/Conv" in reason:
                continue  # with targets=None only layers that look eligible are worth listing
            skipped.append(Skipped(name, type(module).__name__, reason))
            continue
        layers[name] = ExpertLayer(module, num_tasks, layer_rank, alpha, layout, name)
        _replace(model, name, layers[name])
    return model, layers, skipped


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``root`` to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
