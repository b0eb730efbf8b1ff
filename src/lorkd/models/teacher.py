"""Any ``nn.Module`` as a lorkd teacher: task outputs, features from a named layer, input adapter.

:class:`Foundation` wraps a user's foundation model (``feature_root``) so the recipes can use it
like their own multi-task teacher: ``forward(x, task_ids) -> TaskOutput``. Each task's logits come
either from an output the model already has (``heads={task: index | [start, stop] | layer name}``)
or from a task head (``nn.Linear`` for classification, a 1x1 ``ConvNd`` for segmentation) on the
features (the output of layer ``features``, or the model's output when ``features`` is ``None``),
fitted by the adapt stage (:mod:`lorkd.pipelines.stages.adapt`).

Teacher layer names (``features``, ``heads``, and the teacher side of feature distillation) are
names inside the user's module, as ``feature_root.named_modules()`` gives them (and as ``lorkd
teacher CONFIG`` lists them).

:class:`InputAdapter` turns the recipe's input into what the teacher expects (size, channel count,
normalisation); it runs on the teacher's input only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .multitask import MultiTaskNet, TaskOutput
from .taps import LayerTaps, find_layer, first_tensor

__all__ = ["Foundation", "InputAdapter", "OneTask", "first_conv_channels", "output_tensor", "resize_map"]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}  # interpolation mode by spatial dims
HeadSpec = int | Sequence[int] | str


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution of ``model`` (TorchScript modules too), or ``None``."""
    for module in model.modules():
        kind = getattr(module, "original_name", type(module).__name__)
        if kind.startswith("Conv") and isinstance(getattr(module, "in_channels", None), int):
            return int(module.in_channels)
    return None


class InputAdapter(nn.Module):
    """``[B, C, *spatial]`` recipe input -> ``[B, C', *size]`` teacher input (2D and 3D).

    In order: undo the recipe's normalisation (``x * data_std + data_mean``, classification: back to
    ``[0, 1]``), adapt the channels to ``in_channels`` (``repeat``: tile them, ``average``: their mean,
    tiled when ``in_channels > 1``), resize to ``size`` (linear interpolation), normalise with the
    teacher's ``mean``/``std`` (a number or one per channel; one given alone: the other is 0 / 1).
    With neither ``mean`` nor ``std`` the intensities are left as they come (the recipe's
    normalisation is kept, ``data_mean``/``data_std`` are ignored): only channels and size change.

    Raises:
        ConfigError: the channels cannot be adapted (``repeat`` of C channels to a count that is
            not a multiple of C; a channel mismatch and no ``channels`` mode), naming ``key``.
    """

    def __init__(self, spatial_dims: int, size: int | Sequence[int] | None = None, channels: str | None = None,
                 in_channels: int | None = None, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, data_mean: float | None = None,
                 data_std: float | None = None, key: str = "teacher.input") -> None:
        super().__init__()
        self.spatial_dims, self.channels, self.in_channels, self.key = spatial_dims, channels, in_channels, key
        self.size = None if size is None else ([int(size)] * spatial_dims if isinstance(size, int) else list(size))
        if self.size is not None and len(self.size) != spatial_dims:
            raise ConfigError(f"{key}.size: needs {spatial_dims} sizes (or one number), got {size}")
        renormalise = mean is not None or std is not None
        self.data_mean, self.data_std = (data_mean, data_std) if renormalise else (None, None)
        self.register_buffer("mean", _per_channel(mean, 0.0), persistent=False)
        self.register_buffer("std", _per_channel(std, 1.0), persistent=False)
        for name in ("mean", "std"):
            n = len(getattr(self, name))
            if n != 1 and in_channels is not None and n != in_channels:
                raise ConfigError(f"{key}.{name}: give one number or {in_channels} (one per teacher input channel), "
                                  f"got {n}")

    def forward(self, x: Tensor) -> Tensor:
        if self.data_mean is not None and self.data_std is not None:
            x = x * self.data_std + self.data_mean
        c, want = x.shape[1], self.in_channels or x.shape[1]
        if self.channels == "average":
            x = x.mean(1, keepdim=True)
            c = 1
        if c != want:
            if self.channels is None or want % c:
                raise ConfigError(f"{self.key}.channels: the teacher takes {want} channels, the data has {c}; "
                                  "set channels: repeat (1 -> 3) or average (3 -> 1)")
            x = x.repeat(1, want // c, *([1] * self.spatial_dims))
        if self.size is not None and list(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=_LINEAR[self.spatial_dims], align_corners=False)
        shape = (1, -1) + (1,) * self.spatial_dims
        return (x - self.mean.view(shape).to(x.dtype)) / self.std.view(shape).to(x.dtype)


def _per_channel(value: float | Sequence[float] | None, default: float) -> Tensor:
    if value is None:
        value = default
    return torch.tensor([float(value)] if isinstance(value, (int, float)) else [float(v) for v in value])


class Foundation(MultiTaskNet):
    """A user's module as a multi-task teacher (see the module docstring).

    Args:
        module: the foundation model, ``[B, C', *spatial'] -> tensor | tuple | dict``; kept as
            :attr:`feature_root` (also :attr:`backbone`).
        num_classes: classes of each task, in task-id order.
        example: a ``[B, C, *spatial]`` batch of the recipe's input, run once to find the feature
            width and check every mapped output.
        heads: task id -> ``int`` (that element of a tuple/list output),
            ``[start, stop]`` (those channels of the output tensor) or a layer name of ``module``
            (its output). Indices are checked against the example's output (``0 <= index <
            outputs``, ``0 <= start < stop <= channels``); negative indices are refused.
            Tasks not listed get a fitted head on the features.
        features: layer of ``module`` whose output is the feature (``None``: the module's output).
        dense: segmentation: features are a map (resized to the input's size), heads 1x1 convs;
            otherwise features are pooled to ``[B, F]`` and heads are ``nn.Linear``.
        input_adapter: applied to the input first (``None``: identity).
        task_names: for error messages (``teacher.heads.<name>``).
        key: the config key named in errors.

    Raises:
        ConfigError: a layer name that does not exist (close names suggested), a module that
            rejects the example, a mapped output that is not there or has the wrong number of
            classes, an output index or ``[start, stop]`` out of the output's range (names
            ``<key>.heads.<task>`` and the width), a task id in ``heads`` out of range.
    """

    def __init__(self, module: nn.Module, num_classes: Sequence[int], example: Tensor, *,
                 heads: Mapping[int, HeadSpec] | None = None, features: str | None = None, dense: bool = False,
                 input_adapter: nn.Module | None = None, task_names: Sequence[str] | None = None,
                 key: str = "teacher") -> None:
        names = list(task_names or [str(t) for t in range(len(num_classes))])
        heads = dict(heads or {})
        for t in heads:
            if not 0 <= t < len(num_classes):
                raise ConfigError(f"{key}.heads: task id {t} is out of range (tasks 0..{len(num_classes) - 1})")
        spatial_dims = example.ndim - 2
        super().__init__(module, [nn.Identity() for _ in num_classes])
        self.num_classes, self.mapped, self.features_layer = list(num_classes), heads, features
        self.dense, self.spatial_dims, self.key, self.task_names = dense, spatial_dims, key, names
        self.input_adapter = input_adapter or nn.Identity()
        self.frozen_backbone = False
        layers = ([features] if features else []) + [h for h in heads.values() if isinstance(h, str)]
        for name in layers:
            where = f"{key}.features" if name == features else f"{key}.heads"
            find_layer(module, name, where)
        try:
            self._taps = LayerTaps(module, layers, key=key)
        except RuntimeError as err:  # TorchScript: no hooks
            raise ConfigError(f"{key}.features / {key}.heads: cannot read layer {layers[0]!r} of a "
                              f"{type(module).__name__} ({err}); a TorchScript teacher offers only its outputs "
                              "(leave features unset, map heads by output index or [start, stop])") from err
        out = self._probe(example)
        feats = self._features(out, example)
        self.feature_dim = int(feats.shape[1])
        for t in range(len(num_classes)):
            if t in heads:
                got = self._mapped(out, t, example)
                want = (example.shape[0], num_classes[t])
                if tuple(got.shape[:2]) != want:
                    raise ConfigError(f"{key}.heads.{names[t]}: {heads[t]!r} gives shape {list(got.shape)}, but task "
                                      f"{names[t]!r} has {num_classes[t]} classes (want [B, {num_classes[t]}, ...])")
            else:
                self.heads[t] = (_CONVS[spatial_dims](self.feature_dim, num_classes[t], 1) if dense
                                 else nn.Linear(self.feature_dim, num_classes[t]))

    @property
    def feature_root(self) -> nn.Module:
        """The user's module: teacher layer names in configs are names inside it."""
        return self.backbone

    @property
    def fitted_tasks(self) -> list[int]:
        """Tasks whose logits come from a head fitted on the features (not a mapped output)."""
        return [t for t in range(len(self.num_classes)) if t not in self.mapped]

    def freeze_backbone(self, frozen: bool = True) -> "Foundation":
        """Freeze the user's module (no gradients, always eval mode: BatchNorm statistics stay)."""
        self.frozen_backbone = frozen
        for p in self.backbone.parameters():  # not requires_grad_: TorchScript modules lack it
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Foundation":
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def _probe(self, example: Tensor) -> Any:
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self._run(example)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's module rejecting the input
            first = str(err).strip().splitlines()
            raise ConfigError(f"{self.key}: the teacher ({type(self.backbone).__name__}) rejects an input of shape "
                              f"{list(self.input_adapter(example).shape)}: {type(err).__name__}: "
                              f"{first[0] if first else ''} (adapt it with {self.key}.input: size, channels, "
                              "in_channels)") from err
        finally:
            self.train(was)

    def _run(self, x: Tensor) -> Any:
        self._taps.clear()
        out = self.backbone(self.input_adapter(x))
        for name in self._taps.names:
            if name not in self._taps:
                raise ConfigError(f"{self.key}: layer {name!r} did not run in the teacher's forward pass (a "
                                  "TorchScript module runs its layers inside the script, out of reach of hooks; "
                                  "use its outputs)")
        return out

    def _features(self, out: Any, x: Tensor) -> Tensor:
        f = self._taps[self.features_layer] if self.features_layer else output_tensor(out, self.key)
        if not self.dense:
            return f.flatten(2).mean(2) if f.ndim > 2 else f
        return resize_map(f, x.shape[2:], f"{self.key}.features")

    def _mapped(self, out: Any, task: int, x: Tensor) -> Tensor:
        spec, where = self.mapped[task], f"{self.key}.heads.{self.task_names[task]}"
        if isinstance(spec, str):
            y = self._taps[spec]
        elif isinstance(spec, int):
            if not isinstance(out, (tuple, list)):
                raise ConfigError(f"{where}: {spec!r} selects one of several outputs, but the teacher returns a "
                                  f"{type(out).__name__}; give [start, stop] (a slice of its channels) or a layer name")
            if not 0 <= spec < len(out):
                raise ConfigError(f"{where}: output index {spec} is out of range: the teacher returns {len(out)} outputs "
                                  f"(indices 0..{len(out) - 1}; negative indices are not accepted)")
            y = out[spec]
        else:
            y = output_tensor(out, where)
            start, stop = _channel_range(spec, y, where)
            y = y[:, start:stop]
        if not isinstance(y, Tensor):
            raise ConfigError(f"{where}: {spec!r} selects a {type(y).__name__}, not a tensor")
        return resize_map(y, x.shape[2:], where) if self.dense else y

    def forward(self, x: Tensor, task_ids: Tensor) -> TaskOutput:
        """``x`` ``[B, C, *spatial]`` (the recipe's input), ``task_ids`` int64 ``[B]`` -> TaskOutput with
        features ``[B, F]`` (classification) or ``[B, F, *spatial]`` (segmentation, input size).

        Raises:
            ValueError: a task id outside ``[0, T)``.
        """
        out = self._run(x)
        feats = self._features(out, x)
        logits, rows = {}, {}
        for task in torch.unique(task_ids).tolist():
            if not 0 <= task < len(self.num_classes):
                raise ValueError(f"task id {task} is out of range: this teacher has tasks 0..{len(self.num_classes) - 1}")
            rows[task] = torch.nonzero(task_ids == task).squeeze(1)
            if task in self.mapped:
                logits[task] = self._mapped(out, task, x).index_select(0, rows[task])
            else:
                logits[task] = self.heads[task](feats.index_select(0, rows[task]))
        self._taps.clear()
        return TaskOutput(feats, logits, rows)

    def export_task(self, task: int) -> tuple[nn.Module, None]:
        """Task ``task`` as a module ``x -> logits`` (for FLOPs and latency); no spec: it needs lorkd."""
        return OneTask(self, task), None


class OneTask(nn.Module):
    """Task ``task`` of a multi-task teacher ``net`` (``(x, task_ids) -> TaskOutput``) as ``x -> logits``."""

    def __init__(self, net: nn.Module, task: int) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x: Tensor) -> Tensor:
        ids = torch.full((x.shape[0],), self.task, dtype=torch.long, device=x.device)
        return self.net(x, ids).logits[self.task]


def _channel_range(spec: Any, y: Tensor, where: str) -> tuple[int, int]:
    """``(start, stop)`` of a ``[start, stop]`` head spec, checked against the width ``y.shape[1]``
    of the teacher's output: ``0 <= start < stop <= width`` (negative indices are refused, not
    counted from the end, so a typo cannot select other channels than meant).

    Raises:
        ConfigError: not two integers, or out of that range (names ``where``, the spec and the width).
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else []
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"{where}: give an output index, [start, stop] (two integers) or a layer name, got {spec!r}")
    start, stop = items
    width = int(y.shape[1]) if y.ndim > 1 else 0
    if not 0 <= start < stop <= width:
        raise ConfigError(f"{where}: [start, stop] = {items} is out of range: the teacher's output has {width} "
                          f"channels (0 <= start < stop <= {width}; negative indices are not accepted)")
    return start, stop


def output_tensor(out: Any, key: str) -> Tensor:
    """The model's output tensor (:func:`~lorkd.models.taps.first_tensor`); ConfigError naming ``key``
    when it holds none."""
    try:
        return first_tensor(out)
    except TypeError:
        raise ConfigError(f"{key}: the teacher returns a {type(out).__name__} without a tensor") from None


def resize_map(y: Tensor, size: Sequence[int], key: str) -> Tensor:
    """A map ``[B, K, *sp']`` resized (linear interpolation) to ``[B, K, *size]``."""
    if y.ndim != len(size) + 2:
        raise ConfigError(f"{key}: expected a map [B, K, {', '.join(map(str, size))}] for segmentation, "
                          f"got shape {list(y.shape)}")
    if tuple(y.shape[2:]) == tuple(size):
        return y
    return F.interpolate(y, size=list(size), mode=_LINEAR[len(size)], align_corners=False)
