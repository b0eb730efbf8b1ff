"""Feature backbones by name: MONAI networks (2D and 3D), torchvision/timm when installed.

A backbone maps ``[B, C, *spatial]`` to pooled features ``[B, F]``. Each is described by a
JSON-able *architecture spec* ``{"factory": ..., "kwargs": ...}`` (see
:func:`lorkd.experts.build_architecture`), so saved models can be rebuilt from their files.

Names: ``resnet10``, ``resnet18``, ``resnet34``, ``resnet50`` (MONAI ResNet; ``widen`` scales
the widths, ``conv1_stride`` the stem), ``densenet121`` (MONAI), ``tv:<name>`` (a torchvision
classification model, 2D only) and ``timm:<name>`` (a timm model, 2D only).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from monai.networks.nets import DenseNet121
from torch import nn

from ..errors import ConfigError
from ..experts import build_architecture

MONAI_RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50")


def backbone_spec(arch: str, spatial_dims: int, in_channels: int, widen: float = 1.0, conv1_stride: int = 1,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The architecture spec of backbone ``arch``.

    Raises:
        ConfigError: unknown ``arch``, or a torchvision/timm model asked for when the package is
            not installed or in 3D.
    """
    extra = dict(extra or {})
    if arch in MONAI_RESNETS:
        kwargs = {"spatial_dims": spatial_dims, "n_input_channels": in_channels, "feed_forward": False,
                  "widen_factor": widen, "conv1_t_stride": conv1_stride, **extra}
        return {"factory": f"monai.networks.nets.{arch}", "kwargs": kwargs}
    if arch == "densenet121":
        kwargs = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": 1, **extra}
        return {"factory": "lorkd.models.backbones.densenet121_features", "kwargs": kwargs}
    for prefix, package in (("tv:", "torchvision"), ("timm:", "timm")):
        if arch.startswith(prefix):
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"backbone {arch!r} needs the {package} package, which is not installed")
            if spatial_dims != 2:
                raise ConfigError(f"backbone {arch!r} is 2D only; got spatial_dims={spatial_dims}")
            factory = "torchvision_features" if package == "torchvision" else "timm_features"
            return {"factory": f"lorkd.models.backbones.{factory}",
                    "kwargs": {"name": arch[len(prefix):], "in_channels": in_channels, **extra}}
    raise ConfigError(f"unknown backbone {arch!r}; choose one of {', '.join(MONAI_RESNETS)}, densenet121, "
                      "tv:<torchvision model>, timm:<timm model>")


def build_backbone(spec: dict[str, Any]) -> tuple[nn.Module, int]:
    """Build a backbone from its spec; returns ``(module, feature_dim)``."""
    model = build_architecture(spec)
    return model, feature_dim(model)


def feature_dim(model: nn.Module) -> int:
    """The width ``F`` of the pooled features a backbone returns."""
    if hasattr(model, "in_planes") and getattr(model, "fc", None) is None:  # MONAI ResNet, feed_forward=False
        return int(model.in_planes)
    if hasattr(model, "lorkd_feature_dim"):
        return int(model.lorkd_feature_dim)
    raise ConfigError(f"cannot tell the feature width of {type(model).__name__}")


def densenet121_features(**kwargs: Any) -> nn.Module:
    """MONAI DenseNet121 with its last linear layer removed: ``[B, C, *spatial] -> [B, 1024]``."""
    model = DenseNet121(**kwargs)
    model.lorkd_feature_dim = model.class_layers.out.in_features
    model.class_layers.out = nn.Identity()
    return model


def torchvision_features(name: str, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """A torchvision classification model (no pretrained weights) with its classifier removed."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None, **kwargs)
    head_name = "fc" if hasattr(model, "fc") else "classifier"
    head = getattr(model, head_name)
    last = head if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    model.lorkd_feature_dim = last.in_features
    setattr(model, head_name, nn.Identity())
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def timm_features(name: str, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """A timm model (no pretrained weights) returning pooled features."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs)
    model.lorkd_feature_dim = model.num_features
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            return
