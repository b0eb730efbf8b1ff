"""A MONAI segmentation network with one 1x1 convolution head per task: teacher, student and
baselines of the segmentation recipe.

The body is a MONAI UNet, DynUNet or SegResNet (``spatial_dims`` 2 or 3) built with
``out_channels = F``, so it maps ``[B, C, *spatial]`` to a feature map ``[B, F, *spatial]``;
task ``t``'s rows go through its own head ``ConvNd(F, C_t, 1)``. The LoRKD student wraps the
body with :func:`lorkd.add_experts` (transposed convolutions included).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from ..errors import ConfigError
from ..experts import build_architecture
from .multitask import MultiTaskNet, TaskOutput, plain_sequential

__all__ = ["SEG_ARCHS", "MultiTaskSegmenter", "TaskOutput", "plain_segmenter", "segmentation_backbone_spec"]

SEG_ARCHS = ("unet", "dynunet", "segresnet")
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def segmentation_backbone_spec(arch: str, spatial_dims: int, in_channels: int, channels: Sequence[int],
                               features: int, norm: str = "batch", num_res_units: int = 0,
                               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture spec of a MONAI segmentation body ``[B, in_channels, *sp] -> [B, features, *sp]``.

    ``channels`` are the widths per level (UNet ``channels``, DynUNet ``filters``, SegResNet
    ``init_filters = channels[0]``, one down block per level); every level after the first
    halves the resolution, so patch sizes must be divisible by ``2 ** (len(channels) - 1)``
    (sliding-window inference pads smaller volumes). ``extra`` overrides any keyword.

    Raises:
        ConfigError: unknown ``arch``, ``spatial_dims`` not 2 or 3, fewer than 2 levels, bad widths.
    """
    if arch not in SEG_ARCHS:
        raise ConfigError(f"unknown segmentation network {arch!r}; choose one of {', '.join(SEG_ARCHS)}")
    if spatial_dims not in (2, 3):
        raise ConfigError(f"segmentation networks are 2D or 3D, got spatial_dims={spatial_dims}")
    channels = [int(c) for c in channels]
    if len(channels) < 2 or min(channels) < 1 or features < 1:
        raise ConfigError(f"channels must list >= 2 positive widths and features be >= 1, got {channels}, {features}")
    levels = len(channels)
    extra = dict(extra or {})
    if arch == "unet":
        kwargs = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": features,
                  "channels": channels, "strides": [2] * (levels - 1), "num_res_units": num_res_units, "norm": norm}
        return {"factory": "monai.networks.nets.UNet", "kwargs": {**kwargs, **extra}}
    if arch == "dynunet":
        if levels < 3:
            raise ConfigError(f"dynunet needs at least 3 levels of channels, got {channels}")
        strides = [1] + [2] * (levels - 1)
        kwargs = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": features,
                  "kernel_size": [3] * levels, "strides": strides, "upsample_kernel_size": strides[1:],
                  "filters": channels, "norm_name": norm, "res_block": num_res_units > 0}
        return {"factory": "monai.networks.nets.DynUNet", "kwargs": {**kwargs, **extra}}
    kwargs = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": features,
              "init_filters": channels[0], "blocks_down": [1] * levels, "blocks_up": [1] * (levels - 1),
              "norm": norm if norm != "batch" else "BATCH"}
    return {"factory": "monai.networks.nets.SegResNet", "kwargs": {**kwargs, **extra}}


class MultiTaskSegmenter(MultiTaskNet):
    """Segmentation body + one ``ConvNd(F, C_t, 1)`` head per task.

    ``forward(x [B, C, *spatial], task_ids [B])`` returns a
    :class:`~lorkd.models.multitask.TaskOutput` with ``features`` the body's map
    ``[B, F, *spatial]`` and ``logits[t]`` ``[n_t, C_t, *spatial]`` for task ``t``'s rows.

    Args:
        backbone_spec: see :func:`segmentation_backbone_spec` (its ``out_channels`` is ``F``).
        num_classes: classes (background included) of each task, in task-id order.
        experts: ``None`` for a plain body, else keyword arguments of :func:`lorkd.add_experts`.

    Raises:
        ConfigError: the spec has no ``spatial_dims``/``out_channels``; a task with < 2 classes.
    """

    def __init__(self, backbone_spec: dict[str, Any], num_classes: list[int], experts: dict[str, Any] | None = None) -> None:
        kwargs = backbone_spec.get("kwargs", {})
        if "spatial_dims" not in kwargs or "out_channels" not in kwargs:
            raise ConfigError(f"segmentation backbone spec needs spatial_dims and out_channels, got {backbone_spec}")
        if any(c < 2 for c in num_classes):
            raise ConfigError(f"every segmentation task needs >= 2 classes (background included), got {num_classes}")
        dims, dim = int(kwargs["spatial_dims"]), int(kwargs["out_channels"])
        super().__init__(build_architecture(backbone_spec), [_CONVS[dims](dim, c, 1) for c in num_classes], experts)
        self.backbone_spec = backbone_spec
        self.spatial_dims = dims
        self.feature_dim = dim
        self.in_channels = int(kwargs.get("in_channels", 1))
        self.num_classes = list(num_classes)

    def plain_spec(self, task: int) -> dict[str, Any]:
        """The exported model maps ``[B, C, *spatial]`` to ``[B, C_task, *spatial]`` logits."""
        return {"factory": "lorkd.models.segmenter.plain_segmenter",
                "kwargs": {"backbone": self.backbone_spec, "feature_dim": self.feature_dim,
                           "num_classes": self.num_classes[task], "spatial_dims": self.spatial_dims}}


def plain_segmenter(backbone: dict[str, Any], feature_dim: int, num_classes: int, spatial_dims: int) -> nn.Sequential:
    """``nn.Sequential(OrderedDict(backbone=<factory>(**kwargs), head=ConvNd(feature_dim, num_classes, 1)))``:
    an exported segmentation expert (state dict keys ``backbone.*`` and ``head.*``)."""
    return plain_sequential(build_architecture(backbone), _CONVS[spatial_dims](feature_dim, num_classes, 1))
