"""Read the outputs of named layers of any ``nn.Module`` during its forward pass.

A :class:`LayerTaps` registers one forward hook per named submodule and keeps the most recent
output of each. It serves teachers (``teacher.features``), feature distillation between named
layers of teacher and student, and ``lorkd teacher``'s listing of usable layer names.

>>> taps = LayerTaps(model, ["features.denseblock4"])
>>> logits = model(x)
>>> fmap = taps["features.denseblock4"]      # [B, C, H, W], the layer's output in that call
>>> taps.remove()
"""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping

from torch import Tensor, nn

from lorkd.errors import ConfigError

__all__ = ["LayerTaps", "layer_names", "find_layer", "first_tensor"]


def layer_names(model: nn.Module) -> list[str]:
    """Every named submodule of ``model`` (not the root), in registration order."""
    return [name for name, _ in model.named_modules() if name]


def find_layer(model: nn.Module, name: str, key: str = "layer") -> nn.Module:
    """Return ``model``'s submodule called ``name``.

    Raises:
        ConfigError: no such submodule; the message names ``key`` and suggests close names.
    """
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(f"{key}: no layer named {name!r} in {type(model).__name__}{hint}")


def first_tensor(output: object) -> Tensor:
    """``output`` itself when it is a tensor, else its first tensor value (a tuple/list, e.g.
    attention's ``(out, weights)``, or a mapping, e.g. ``{"logits": ...}``).

    Raises:
        TypeError: ``output`` holds no tensor.
    """
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else []
    for item in values:
        if isinstance(item, Tensor):
            return item
    raise TypeError(f"an output of type {type(output).__name__} holds no tensor")


class LayerTaps:
    """Forward hooks that keep the latest output of each named layer.

    Args:
        model: any module.
        names: submodule names as in ``model.named_modules()``.
        key: the config key the names came from, used in error messages.

    Raises:
        ConfigError: a name is not a submodule of ``model`` (close names suggested).

    ``taps[name]`` is the tensor the layer returned in the latest forward (the first tensor of a
    tuple output), with its autograd graph: detach it yourself for a frozen teacher.
    ``KeyError`` if the layer did not run since the last :meth:`clear`.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], key: str = "layer") -> None:
        self.names = list(dict.fromkeys(names))
        self._outputs: dict[str, Tensor] = {}
        self._handles = []
        for name in self.names:
            layer = find_layer(model, name, key)
            self._handles.append(layer.register_forward_hook(self._keeper(name)))

    def _keeper(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            self._outputs[name] = first_tensor(output)
        return hook

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._outputs:
            raise KeyError(f"layer {name!r} has not run since the taps were cleared")
        return self._outputs[name]

    def __contains__(self, name: str) -> bool:
        return name in self._outputs

    def clear(self) -> None:
        """Forget the kept outputs (frees their memory)."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove every hook and forget the outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> "LayerTaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
