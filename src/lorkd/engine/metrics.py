"""Evaluation metrics (numpy based) and model cost measurements.

Array arguments accept numpy arrays, array-likes or torch tensors (tensors are detached and
copied to CPU). HD95 goes through MONAI's distance metrics (which use scipy); nothing needs sklearn.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lorkd.errors import ConfigError, DataError

__all__ = [
    "accuracy",
    "roc_auc",
    "dice_per_class",
    "hd95_per_class",
    "structure_errors",
    "image_diagonal",
    "count_parameters",
    "count_flops",
    "cpu_latency_ms",
]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _int_labels(labels: np.ndarray, name: str, fn: str) -> np.ndarray:
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind in "fb" and labels.size and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        return labels.astype(np.int64)
    if labels.dtype.kind == "f" and labels.size == 0:
        return labels.astype(np.int64)
    raise DataError(f"{fn}: {name} must hold integer class indices, got dtype {labels.dtype}")


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of correct predictions.

    Args:
        predictions: ``[N, C]`` scores (probabilities or logits; the arg-max over dim 1 is the
            prediction) or ``[N]`` integer class predictions.
        labels: ``[N]`` integer class indices.

    Returns:
        Accuracy in ``[0, 1]`` as a Python float.

    Raises:
        DataError (a ValueError): ``N == 0``, ``N`` differs between the two, wrong ndim, or
            non-integer predictions/labels where integers are required.
    """
    pred = _np(predictions)
    y = _int_labels(_np(labels), "labels", "accuracy")
    if y.ndim != 1:
        raise DataError(f"accuracy: labels must be [N], got shape {y.shape}")
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    elif pred.ndim == 1:
        pred = _int_labels(pred, "predictions", "accuracy")
    else:
        raise DataError(f"accuracy: predictions must be [N, C] scores or [N] classes, got shape {pred.shape}")
    if pred.shape[0] != y.shape[0]:
        raise DataError(f"accuracy: predictions shape {pred.shape} and labels shape {y.shape} differ in N")
    if y.shape[0] == 0:
        raise DataError("accuracy: got 0 samples")
    return float(np.mean(pred == y))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` ([N]); tied values all get the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last element of each group of ties
    group_rank = ends - (counts - 1) / 2.0
    return group_rank[inverse.reshape(-1)]


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score_pos > score_neg) + 0.5 P(tie). nan without positives or negatives."""
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve, rank based (Mann-Whitney U, ties count one half).

    * ``[N]`` scores, or ``[N, 2]`` with ``C == 2``: binary AUC of the positive class (label 1;
      column 1 of a ``[N, 2]`` array).
    * ``[N, C]`` with ``C > 2``: macro average over classes of the one-vs-rest AUC of column ``c``
      against ``labels == c``.

    Undefined AUC: a class with no positive or no negative sample has no AUC; then the result is
    ``nan`` (for multi-class, the macro mean is ``nan`` as soon as one class is undefined, so that
    a silently partial average is never reported).

    Args:
        scores: ``[N]`` or ``[N, C]`` probabilities (any monotone score works; only ranks matter).
        labels: ``[N]`` integer class indices in ``[0, C)``.

    Returns:
        AUC in ``[0, 1]`` as a Python float, or ``nan`` (see above).

    Raises:
        DataError (a ValueError): shapes disagree, ``C < 2``, non-finite scores, or labels outside
            ``[0, C)``.
    """
    s = _np(scores).astype(np.float64)
    y = _int_labels(_np(labels), "labels", "roc_auc")
    if y.ndim != 1 or s.ndim not in (1, 2) or s.shape[0] != y.shape[0]:
        raise DataError(f"roc_auc: scores must be [N] or [N, C] and labels [N]; got shapes {s.shape} and {y.shape}")
    if s.ndim == 2 and s.shape[1] < 2:
        raise DataError(f"roc_auc: need C >= 2 score columns, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise DataError("roc_auc: scores contain nan or inf")
    num_classes = 2 if s.ndim == 1 else s.shape[1]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"roc_auc: labels must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    if s.ndim == 1:
        return _binary_auc(s, y == 1)
    if num_classes == 2:
        return _binary_auc(s[:, 1], y == 1)
    aucs = [_binary_auc(s[:, c], y == c) for c in range(num_classes)]
    return float(np.mean(aucs))  # nan if any class is nan


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def _check_seg(pred: Any, target: Any, num_classes: int, fn: str) -> tuple[np.ndarray, np.ndarray]:
    p = _int_labels(_np(pred), "pred", fn)
    t = _int_labels(_np(target), "target", fn)
    if p.shape != t.shape:
        raise DataError(f"{fn}: pred shape {p.shape} != target shape {t.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ConfigError(f"{fn}: num_classes must be an int >= 2, got {num_classes!r}")
    for name, a in (("pred", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise DataError(f"{fn}: {name} values must lie in [0, {num_classes}), got [{a.min()}, {a.max()}]")
    return p, t


def dice_per_class(pred: Any, target: Any, num_classes: int, absent: float = 1.0) -> np.ndarray:
    """Foreground Dice ``2|P & T| / (|P| + |T|)`` for classes ``1..num_classes-1``.

    Args:
        pred, target: integer label maps of the same shape ``[*spatial]`` (any ndim, e.g.
            ``[H, W]`` or ``[D, H, W]``), values in ``[0, num_classes)``.
        num_classes: number of classes including background 0 (``>= 2``).
        absent: the value of a class absent from both ``pred`` and ``target``: 1.0 (nothing to
            find and nothing predicted is a correct answer; MONAI's
            ``DiceMetric(ignore_empty=False)`` convention), or ``nan`` to leave it out of a
            NaN-skipping mean (as MONAI's ``DiceMetric(ignore_empty=True)``; the pipelines' means).

    Returns:
        float64 array ``[num_classes - 1]``; entry ``c - 1`` is class ``c``. A class present in
        only one of them gives 0.

    Raises:
        DataError (a ValueError): shapes differ, non-integer maps, values out of range.
        ConfigError (a ValueError): ``num_classes < 2``.
    """
    p, t = _check_seg(pred, target, num_classes, "dice_per_class")
    out = np.full(num_classes - 1, absent, dtype=np.float64)
    for c in range(1, num_classes):
        pc, tc = p == c, t == c
        denom = int(pc.sum()) + int(tc.sum())
        if denom:
            out[c - 1] = 2.0 * int(np.logical_and(pc, tc).sum()) / denom
    return out


def structure_errors(pred: Any, target: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Which foreground structures are missed or spurious in one case.

    Args:
        pred, target: integer label maps of the same shape ``[*spatial]``.
        num_classes: classes including background 0 (``>= 2``).

    Returns:
        ``(missed, spurious)``: two bool arrays ``[num_classes - 1]``; ``missed[c - 1]``: class ``c``
        is in ``target`` but nowhere in ``pred``; ``spurious[c - 1]``: class ``c`` is predicted but
        absent from ``target``.

    Raises:
        DataError / ConfigError as :func:`dice_per_class`.
    """
    p, t = _check_seg(pred, target, num_classes, "structure_errors")
    in_p = np.array([(p == c).any() for c in range(1, num_classes)], dtype=bool)
    in_t = np.array([(t == c).any() for c in range(1, num_classes)], dtype=bool)
    return in_t & ~in_p, in_p & ~in_t


def _spacing(spacing: Sequence[float] | None, shape: tuple[int, ...], fn: str) -> np.ndarray:
    if spacing is None:
        return np.ones(len(shape), dtype=np.float64)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.shape[0] != len(shape) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
        raise ConfigError(
            f"{fn}: spacing must hold {len(shape)} positive numbers (one per axis of shape {shape}), got {spacing!r}"
        )
    return sp


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Length of the diagonal of an image of ``shape`` voxels of size ``spacing`` (``None``: 1):
    ``sqrt(sum((shape_i * spacing_i) ** 2))``, the HD95 penalty of a missed or spurious structure."""
    sp = _spacing(spacing, tuple(shape), "image_diagonal")
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * sp) ** 2)))


def hd95_per_class(
    pred: Any, target: Any, num_classes: int, spacing: Sequence[float] | None = None,
    penalty: float | None = None,
) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance per foreground class ``1..num_classes-1``.

    Computed by MONAI's ``compute_hausdorff_distance(percentile=95, spacing=spacing)``: the
    surface of a class mask is its voxels with a face-connected neighbour (4-neighbourhood in 2D,
    6 in 3D) outside the mask (outside the array counts as background); for each surface voxel of
    ``pred`` the Euclidean distance in ``spacing`` units (mm when ``spacing`` is in mm) to the
    nearest surface voxel of ``target`` is taken (exact distance transform, scipy), and vice
    versa; the result is the larger of the two directed 95th percentiles.

    A class present in only one of ``pred`` and ``target`` (a missed or spurious structure; see
    :func:`structure_errors`) gets ``penalty``, by default :func:`image_diagonal` (the largest
    distance two voxels of the image can have), so such a case counts as the worst possible one
    instead of being dropped from a mean. A class absent from both gives ``nan`` (no surface to
    compare: leave it out of means).

    Args:
        pred, target: integer label maps of the same shape ``[*spatial]``.
        num_classes: classes including background 0 (``>= 2``).
        spacing: voxel size per axis (length ``pred.ndim``, positive); ``None`` means 1.
        penalty: distance given to a missed or spurious class; ``None``: the image diagonal.

    Returns:
        float64 array ``[num_classes - 1]``.

    Raises:
        DataError (a ValueError): shapes differ, non-integer maps, values out of range.
        ConfigError (a ValueError): ``num_classes < 2``; ``spacing`` of the wrong length or with
            non-positive entries.
    """
    p, t = _check_seg(pred, target, num_classes, "hd95_per_class")
    sp = _spacing(spacing, p.shape, "hd95_per_class")
    worst = image_diagonal(p.shape, sp) if penalty is None else float(penalty)
    out = np.full(num_classes - 1, np.nan, dtype=np.float64)
    for c in range(1, num_classes):
        pc, tc = p == c, t == c
        has_p, has_t = bool(pc.any()), bool(tc.any())
        if has_p != has_t:
            out[c - 1] = worst
        elif has_p:
            with warnings.catch_warnings():  # MONAI's own internal use of a deprecated argument
                warnings.simplefilter("ignore", FutureWarning)
                d = compute_hausdorff_distance(
                    torch.from_numpy(pc)[None, None], torch.from_numpy(tc)[None, None],
                    include_background=True, percentile=95, spacing=sp.tolist(),
                )
            out[c - 1] = float(d.reshape(-1)[0])
    return out


# --------------------------------------------------------------------------------------------
# Model cost
# --------------------------------------------------------------------------------------------


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (shared parameters counted once); with
    ``trainable_only`` only those with ``requires_grad``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _as_args(example_input: Any) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _no_op_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
    return None


def count_flops(module: nn.Module, example_input: Any) -> int:
    """Multiply-accumulates (MACs) of one forward pass of ``module(*example_input)``.

    Counts only calls of ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``nn.Linear``
    submodules (each call counts, so a layer used twice counts twice):

    * conv: ``output.numel() * (in_channels / groups) * prod(kernel_size)``;
    * transposed conv: ``input.numel() * (out_channels / groups) * prod(kernel_size)`` (each input
      element is scattered onto that many outputs);
    * linear: ``in_features * out_features`` per row, rows = ``output.numel() / out_features``.

    Bias additions, normalisation, activations, pooling, attention matmuls and functional
    ``F.conv*`` / ``F.linear`` calls (e.g. inside expert layers) are not counted. The count covers
    the whole batch of ``example_input``. The forward runs in eval mode under ``torch.no_grad()``;
    the module's training flag is restored afterwards.

    The counting is ``torch.utils.flop_counter.FlopCounterMode``'s (per module, ``2 * MACs`` for
    ``aten.convolution``, ``mm``, ``addmm``, ...): the sum over the conv and linear submodules of
    the operations run inside them, halved to MACs.

    Args:
        module: any ``nn.Module``.
        example_input: a tensor, or a tuple/list of positional arguments.

    Returns:
        MACs as a Python int.
    """
    root = type(module).__name__  # FlopCounterMode names submodules "<root class>.<path>"
    counted = {name: m for name, m in module.named_modules() if isinstance(m, _CONV_TYPES + _CONVT_TYPES + (nn.Linear,))}
    layers = {f"{root}.{name}" if name else root for name in counted}
    # A hook on each counted layer keeps fused fast paths (nn.TransformerEncoderLayer in eval mode
    # skips its nn.Linear modules unless they have hooks) from bypassing the layers.
    handles = [m.register_forward_hook(_no_op_hook) for m in counted.values()]
    counter = FlopCounterMode(display=False)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad(), counter:
            module(*_as_args(example_input))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    flops = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name in layers)
    return int(flops) // 2


def cpu_latency_ms(module: nn.Module, example_input: Any, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock time in milliseconds of one forward pass ``module(*example_input)``
    (one whole batch), in eval mode under ``torch.inference_mode()``.

    ``warmup`` untimed passes run first. The module's training flag is restored afterwards. The
    thread count is whatever ``torch.get_num_threads()`` is; set it before calling for
    comparable numbers.

    Raises:
        ConfigError (a ValueError): ``repeats < 1`` or ``warmup < 0``; the module or an input
            tensor is not on the CPU.
    """
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"cpu_latency_ms: need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    args = _as_args(example_input)
    tensors = list(module.parameters()) + list(module.buffers()) + [a for a in args if isinstance(a, torch.Tensor)]
    off_cpu = {str(t.device) for t in tensors if t.device.type != "cpu"}
    if off_cpu:
        raise ConfigError(f"cpu_latency_ms: module and inputs must be on the CPU, found device(s) {sorted(off_cpu)}")
    was_training = module.training
    times = []
    try:
        module.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                module(*args)
            for _ in range(repeats):
                start = time.perf_counter()
                module(*args)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        module.train(was_training)
    return float(statistics.median(times))
