"""Sliding-window inference on whole images and volumes (MONAI's ``sliding_window_inference``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor

__all__ = ["sliding_window_logits"]


@torch.no_grad()
def sliding_window_logits(predictor: Callable[[Tensor], Tensor], image: Tensor, roi_size: Sequence[int],
                          overlap: float = 0.25, sw_batch_size: int = 4, mode: str = "constant",
                          device: torch.device | str = "cpu") -> Tensor:
    """Logits of a whole image by overlapping windows of ``roi_size``.

    Args:
        predictor: ``[n, C, *roi] -> [n, K, *roi]`` (a network in eval mode).
        image: ``[C, *spatial]``. With ``len(spatial) == len(roi_size) + 1`` (a volume through a
            2D network) the first spatial axis is taken as a stack of slices, each inferred alone.
        roi_size: window size; an image smaller than it along an axis is padded (and cropped back).

    Returns:
        float ``[K, *spatial]`` on the CPU (window predictions blended by ``mode``).

    Raises:
        ValueError: ``image`` has neither ``len(roi_size)`` nor ``len(roi_size) + 1`` spatial dims.
    """
    roi = tuple(int(r) for r in roi_size)
    spatial = image.ndim - 1
    x = image.to(device, torch.float32)
    if spatial == len(roi) + 1:
        x = x.movedim(1, 0)  # [S, C, *plane]: one 2D image per slice
        out = sliding_window_inference(x, roi, sw_batch_size, predictor, overlap=overlap, mode=mode)
        return out.movedim(0, 1).float().cpu()
    if spatial != len(roi):
        raise ValueError(f"sliding_window_logits: image of shape {tuple(image.shape)} ([C, *spatial]) does not fit "
                         f"a window of {len(roi)} dims {roi}")
    return sliding_window_inference(x[None], roi, sw_batch_size, predictor, overlap=overlap, mode=mode)[0].float().cpu()
