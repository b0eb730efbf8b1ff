"""Task-wise decorrelation (TwD) for a router: a supervised-contrastive loss with the task as label.

MoLA-Router trains its router with TwD so that its representations of different tasks separate
(Khosla et al.'s supervised contrastive loss on the router's projected outputs). For anchor ``i``
with positives ``P(i)`` (the other samples of its task) and ``z`` the L2-normalised projections::

    l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i . z_p / tau) / sum_{a != i} exp(z_i . z_a / tau) )

and TwD is the mean of ``l_i`` over the anchors that have at least one positive (0 when none has).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["twd_loss", "router_loss"]


def twd_loss(projection: Tensor, task_ids: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised-contrastive loss of ``projection`` with ``task_ids`` as labels (see the module).

    Args:
        projection: ``[B, P]`` float, the router's projected outputs (normalised inside).
        task_ids: ``[B]`` integer task of each sample.
        temperature: ``tau > 0``.

    Returns:
        a scalar; 0 (still differentiable) when no sample shares its task with another.

    Raises:
        ValueError: ``projection`` is not a float ``[B, P]``, ``task_ids`` not an integer ``[B]``,
            or ``temperature <= 0``.
    """
    if projection.dim() != 2 or not projection.dtype.is_floating_point:
        raise ValueError(f"projection must be a float tensor [B, P], got {projection.dtype} {list(projection.shape)}")
    if task_ids.dim() != 1 or task_ids.shape[0] != projection.shape[0] or task_ids.dtype.is_floating_point \
            or task_ids.dtype == torch.bool:
        raise ValueError(f"task_ids must be an integer tensor [{projection.shape[0]}], "
                         f"got {task_ids.dtype} {list(task_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    z = F.normalize(projection, dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (task_ids.unsqueeze(0) == task_ids.unsqueeze(1)) & ~self_mask
    count = positives.sum(dim=1)
    per_anchor = -(log_prob * positives).sum(dim=1) / count.clamp(min=1)
    anchors = count > 0
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)


def router_loss(logits: Tensor, projection: Tensor, task_ids: Tensor, twd_weight: float = 0.1,
                task_loss_weight: float = 0.0, temperature: float = 0.07) -> Tensor:
    """The router's own loss: ``twd_weight * twd_loss(projection, task_ids, temperature) +
    task_loss_weight * cross_entropy(logits, task_ids)`` (terms with weight 0 are skipped).

    Args:
        logits: ``[B, T]`` router logits; projection ``[B, P]``; task_ids ``[B]`` integer.

    Raises:
        ValueError: a negative weight, or what :func:`twd_loss` raises.
    """
    if twd_weight < 0 or task_loss_weight < 0:
        raise ValueError(f"twd_weight and task_loss_weight must be >= 0, got {twd_weight!r}, {task_loss_weight!r}")
    loss = logits.new_zeros(())
    if twd_weight:
        loss = loss + twd_weight * twd_loss(projection, task_ids, temperature)
    if task_loss_weight:
        loss = loss + task_loss_weight * F.cross_entropy(logits, task_ids)
    return loss
