"""Which training images to keep: random, diverse (DiSF's greedy) or k-centre subsets.

* :func:`select` picks ``n`` rows of a feature matrix ``[N, D]``: ``diverse`` makes the
  selected rows' (L2-normalised) second-moment matrix as close to a multiple of the identity as
  the greedy can, i.e. its eigenvalues as uniform as possible (DiSF); ``kcenter`` is the classical
  farthest-first coreset; ``random`` a seeded permutation.
* :func:`subset_indices` does it per class (each class keeps its share of ``n``, as
  :func:`~lorkd.data.medmnist.cap_train` always did); ``random`` there *is* ``cap_train``'s draw.
* :func:`task_features` runs a teacher once over a task's training images, in batches, and
  returns its pooled features; :func:`select_for_task` chains the two.

Both greedies keep one value per candidate and update it with one matrix-vector product per pick
(memory ``O(N)`` beside the features, time ``O(n N D)``); see docs/configuration.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lorkd.data.batching import collate_task_batch
from lorkd.data.medmnist import ClassificationTask, stratified_random
from lorkd.data.multitask import MultiTaskDataset
from lorkd.errors import DataError
from lorkd.models.multitask import MultiTaskNet
from lorkd.models.taps import LayerTaps, first_tensor

__all__ = ["METHODS", "diversity_cost", "select", "select_for_task", "subset_indices", "task_features"]

METHODS = ("random", "diverse", "kcenter")


def _matrix(features: Any) -> Tensor:
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features)
    if x.ndim != 2:
        raise ValueError(f"features must be a [N, D] matrix, got shape {list(x.shape)}")
    return x.detach().to("cpu", torch.float32)


def _normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def diversity_cost(features: Any) -> float:
    """DiSF's objective on the rows of ``features`` ``[n, D]``: ``||sum_i x_i x_i^T||_F^2`` of the
    L2-normalised rows ``x_i`` (the sum of the squared eigenvalues of their second-moment matrix;
    the eigenvalues sum to ``n``, so the smaller, the more uniform). Raises ``ValueError`` for a
    matrix that is not 2D."""
    x = _normalise(_matrix(features)).double()
    return float(((x @ x.T) ** 2).sum())


def _diverse(x: Tensor, n: int, first: int) -> list[int]:
    """Greedy minimisation of :func:`diversity_cost`: adding ``c`` to ``S`` costs
    ``2 sum_{i in S} (x_c . x_i)^2 + ||x_c||^4``, and ``||x_c|| = 1``, so ``cost[c] = sum_{i in S}
    (x_c . x_i)^2`` is all the greedy needs: one matrix-vector product per pick."""
    x = _normalise(x)
    cost = torch.zeros(x.shape[0], dtype=torch.float64)
    chosen = [first]
    for _ in range(n - 1):
        cost += (x @ x[chosen[-1]]).double() ** 2
        cost[chosen[-1]] = float("inf")
        chosen.append(int(torch.argmin(cost)))
    return chosen


def _kcenter(x: Tensor, n: int, first: int) -> list[int]:
    """Greedy k-centre (farthest-first) on the L2-normalised rows: each pick is the row farthest
    from every row picked so far (squared distance ``2 - 2 x_c . x_s``)."""
    x = _normalise(x)
    dist = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    chosen = [first]
    for _ in range(n - 1):
        dist = torch.minimum(dist, (2 - 2 * (x @ x[chosen[-1]])).double().clamp_min(0))
        dist[chosen[-1]] = -1.0  # never again, even where duplicates sit at distance 0
        chosen.append(int(torch.argmax(dist)))
    return chosen


def select(features: Any, n: int, method: str = "diverse", seed: int = 0) -> np.ndarray:
    """The ``n`` rows of ``features`` that ``method`` keeps, in the order chosen.

    Args:
        features: ``[N, D]`` tensor or array (any float dtype; rows are L2-normalised here).
        n: how many rows, ``1 <= n <= N``.
        method: ``"diverse"`` (DiSF's greedy, :func:`diversity_cost`), ``"kcenter"`` (farthest
            first) or ``"random"``.
        seed: the first pick of either greedy (every row ties at the start) and the random draw.

    Returns:
        int64 ``[n]`` distinct row indices.

    Raises:
        ValueError: ``features`` not 2D, ``n`` outside ``[1, N]``, an unknown ``method``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    x = _matrix(features)
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"cannot select {n} of {x.shape[0]} rows (want 1 <= n <= N)")
    rng = np.random.default_rng(seed)
    if method == "random":
        return rng.permutation(x.shape[0])[:n].astype(np.int64)
    first = int(rng.integers(x.shape[0]))
    return np.asarray((_diverse if method == "diverse" else _kcenter)(x, n, first), dtype=np.int64)


def _budgets(labels: np.ndarray, n: int) -> dict[int, int]:
    """Each class's share of ``n`` (at least one), trimmed one at a time from the largest share
    (then the larger class) until they sum to at most ``n`` (with more classes than ``n``, some get 0)."""
    classes, counts = np.unique(labels, return_counts=True)
    size = dict(zip(classes.tolist(), counts.tolist()))
    want = {c: max(1, int(round(n * k / len(labels)))) for c, k in size.items()}
    while sum(want.values()) > n:
        want[max(want, key=lambda c: (want[c], size[c], -c))] -= 1
    return {c: k for c, k in want.items() if k > 0}


def subset_indices(labels: np.ndarray, n: int, method: str = "random", features: Any = None, seed: int = 0,
                   name: str = "task") -> np.ndarray:
    """Sorted indices of a class-stratified subset of ``n`` items (each class keeps its share, at least one).

    ``random`` is :func:`~lorkd.data.medmnist.stratified_random`, ``cap_train``'s draw (a pool of at
    most ``n`` items is kept whole); ``diverse`` / ``kcenter`` run :func:`select` within each class on
    ``features`` ``[N, D]`` (rows aligned with ``labels`` ``[N]``).

    Raises:
        DataError: a greedy method asked for more items than the pool holds, or without features
            (names ``name``, the task).
        ValueError: an unknown ``method``.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if method == "random":
        return stratified_random(labels, n, seed)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if n > total:
        raise DataError(f"{name}: cannot select {n} training images with {method!r}: its pool holds only {total}")
    if features is None or len(features) != total:
        raise DataError(f"{name}: {method!r} selection needs one feature row per training image ({total})")
    x = _matrix(features)
    keep = []
    for c, k in _budgets(labels, n).items():
        idx = np.flatnonzero(labels == c)
        keep.append(idx[select(x[idx], k, method, seed)])
    return np.sort(np.concatenate(keep))


@torch.no_grad()
def task_features(teacher: nn.Module, task: ClassificationTask, layer: str | None = None, batch_size: int = 256,
                  device: str | torch.device = "cpu", **dataset: Any) -> Tensor:
    """The teacher's pooled features of ``task``'s training images, ``[N, F]`` float32 on the CPU.

    ``teacher`` is a lorkd multi-task network (a :class:`~lorkd.models.teacher.Foundation`, a
    trained teacher: its ``features`` output, or ``layer`` of its ``feature_root``) or any module
    ``x -> tensor`` (its output, or ``layer``'s). Maps ``[B, C, *spatial]`` are averaged over space.
    The images go through :class:`~lorkd.data.multitask.MultiTaskDataset` (no augmentation) with
    ``dataset`` (``size``, ``channels``, ``mean``, ``std``); the teacher runs in eval mode, in
    batches of ``batch_size``, and its mode is restored.

    Raises:
        ConfigError: ``layer`` is not a layer of the teacher (close names suggested).
        DataError: what :class:`MultiTaskDataset` raises.
    """
    data = MultiTaskDataset([task], "train", augment=False, **dataset)
    multi = isinstance(teacher, MultiTaskNet)
    taps = LayerTaps(teacher.feature_root if multi else teacher, [layer], key="data.select.features") if layer else None
    was = teacher.training
    teacher.eval()
    out = []
    try:
        for start in range(0, len(data), batch_size):
            batch = collate_task_batch([data[i] for i in range(start, min(start + batch_size, len(data)))]).to(device)
            result = teacher(batch.images, batch.task_ids) if multi else teacher(batch.images)
            f = taps[layer] if taps else (result.features if multi else first_tensor(result))
            out.append((f.flatten(2).mean(2) if f.ndim > 2 else f).float().cpu())
    finally:
        teacher.train(was)
        if taps:
            taps.remove()
    return torch.cat(out)


def select_for_task(teacher: nn.Module, task: ClassificationTask, n: int, method: str = "diverse",
                    layer: str | None = None, batch_size: int = 256, seed: int = 0,
                    device: str | torch.device = "cpu", **dataset: Any) -> np.ndarray:
    """Sorted indices into ``task``'s training split of the class-stratified subset of ``n`` images
    that ``method`` keeps on ``teacher``'s features (:func:`task_features`, then
    :func:`subset_indices`; ``random`` reads no features).

    Raises:
        DataError: the pool holds fewer than ``n`` images (names the task); what
            :func:`task_features` raises.
    """
    labels = task.labels["train"]
    if method == "random":
        return subset_indices(labels, n, "random", seed=seed, name=task.name)
    if n > len(labels):
        raise DataError(f"{task.name}: cannot select {n} training images with {method!r}: its pool holds only "
                        f"{len(labels)}")
    feats = task_features(teacher, task, layer, batch_size, device, **dataset)
    return subset_indices(labels, n, method, feats, seed, task.name)
