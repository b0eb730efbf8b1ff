"""Load a user's foundation model from disk, whatever form it comes in.

:func:`load_foundation` returns a plain ``nn.Module`` (frozen, eval mode) from one of these kinds:

* ``state_dict``: a ``.safetensors`` / ``.pt`` / ``.pth`` file of weights plus the architecture
  (``build``: a module, or ``factory: "package.module:function"`` with ``kwargs``); ``.pt`` files
  are read with ``torch.load(weights_only=True)``; a ``{"state_dict": ...}`` or ``{"model": ...}``
  wrapper is unwrapped;
* ``torchscript``: a scripted or traced module file (``torch.jit.load``);
* ``monai_bundle``: a MONAI bundle folder (``configs/inference.{json,yaml}`` and
  ``models/model.pt``), the network built by ``monai.bundle.ConfigParser`` from ``network_key``;
* ``torchvision`` / ``timm``: a model ``name`` of that package plus a local weights file (the
  package must be installed).

``key_map`` rewrites the keys of a weights file before loading: ``strip_prefix`` (e.g.
``"module."`` of a DDP checkpoint) and ``rename`` (``[regex, replacement]`` pairs, in order).

Every error a user can cause is a :class:`~lorkd.errors.ConfigError` naming ``key`` (the config
key the options came from, ``teacher.source`` in the recipes).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["KINDS", "load_foundation", "load_weights", "map_keys", "import_factory"]

KINDS = ("lorkd", "state_dict", "torchscript", "monai_bundle", "torchvision", "timm")
_LISTED = 8  # keys listed per kind of mismatch


def import_factory(factory: str, key: str = "factory") -> Callable[..., nn.Module]:
    """``"package.module:function"`` (or ``"package.module.function"``) -> the callable.

    Raises:
        ConfigError: the module cannot be imported or has no such attribute (names ``key``).
    """
    module_name, sep, attr = factory.partition(":")
    if not sep:
        module_name, _, attr = factory.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {factory!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: {module_name!r} has no callable {attr!r}")
    return fn


def map_keys(state: Mapping[str, Tensor], strip_prefix: str | None = None,
             rename: Sequence[Sequence[str]] = ()) -> dict[str, Tensor]:
    """Rewrite state-dict keys: drop ``strip_prefix`` where a key starts with it, then apply each
    ``(regex, replacement)`` of ``rename`` in order (``re.sub``)."""
    out = {}
    for k, v in state.items():
        if strip_prefix and k.startswith(strip_prefix):
            k = k[len(strip_prefix):]
        for pattern, repl in rename:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def read_state_dict(path: Path, key: str) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` or ``torch.save`` file (``weights_only=True``).

    Raises:
        ConfigError: missing or unreadable file, or no mapping of tensors inside.
    """
    if not path.is_file():
        raise ConfigError(f"{key}.path: file {path} not found")
    try:
        if path.suffix == ".safetensors":
            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
        raise ConfigError(f"{key}.path: {path} is not a readable weights file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from err
    for wrapper in ("state_dict", "model", "network"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{key}.path: {path} holds no state dict (a mapping of names to tensors)")
    return dict(obj)


def load_weights(model: nn.Module, state: Mapping[str, Tensor], key: str, source: str, strict: bool = True) -> None:
    """``model.load_state_dict(state)`` with an error that lists the keys that do not fit.

    Raises:
        ConfigError: missing / unexpected keys (when ``strict``) or a shape mismatch; the message
            lists them and says what helps: ``{key}.key_map`` for names (``strip_prefix: P.`` when
            every unexpected key starts with a ``P.`` whose removal gives model keys), the factory's
            ``{key}.kwargs`` for shapes.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_some(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_some(shapes)}")
    if problems:
        fixes = []
        if strict and (missing or unexpected):
            prefix = unexpected[0].split(".")[0] + "." if unexpected else ""
            if prefix and all(k.startswith(prefix) for k in unexpected) and any(k[len(prefix):] in own for k in unexpected):
                fixes.append(f"every unexpected key starts with {prefix!r}: set {key}.key_map: {{strip_prefix: {prefix}}}")
            else:
                fixes.append(f"fix the names with {key}.key_map (strip_prefix, rename) or set strict: false to skip "
                             "missing/unexpected keys")
        if shapes:
            fixes.append(f"shapes must fit: build the model as the weights were trained with the factory's "
                         f"{key}.kwargs (channels, classes, widths); key_map and strict cannot change shapes")
        raise ConfigError(f"{key}: the weights of {source} do not fit the {type(model).__name__}: "
                          + "; ".join(problems) + ". " + "; ".join(fixes))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _some(items: list[str]) -> str:
    return ", ".join(items[:_LISTED]) + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def load_foundation(kind: str, path: str | Path, *, build: nn.Module | Callable[[], nn.Module] | None = None,
                    factory: str | None = None, kwargs: Mapping[str, Any] | None = None, name: str | None = None,
                    strip_prefix: str | None = None, rename: Sequence[Sequence[str]] = (), strict: bool = True,
                    network_key: str = "network_def", key: str = "teacher.source") -> nn.Module:
    """Load a foundation model of ``kind`` from ``path``; the result is frozen and in eval mode.

    Args:
        kind: one of :data:`KINDS` except ``lorkd`` (a lorkd ``teacher/`` folder is rebuilt by the
            recipes, which know its tasks).
        path: weights file, TorchScript file or bundle folder.
        build: ``state_dict``: the architecture (a module, or a callable returning one).
        factory, kwargs: ``state_dict``: the architecture as ``"package.module:function"`` called
            with ``kwargs`` (instead of ``build``); ``torchvision``/``timm``: extra model kwargs.
        name: ``torchvision``/``timm``: the model name.
        strip_prefix, rename, strict: key mapping and strictness of the weights (not torchscript).
        network_key: ``monai_bundle``: the config entry of the network.
        key: the config key named in errors.

    Raises:
        ConfigError: unknown kind, missing file, a package that is not installed, keys that do
            not fit (listed), or an architecture that cannot be built.
    """
    path = Path(path).expanduser()
    kwargs = dict(kwargs or {})
    if kind not in KINDS or kind == "lorkd":
        raise ConfigError(f"{key}.kind: {kind!r} is not one of {', '.join(k for k in KINDS if k != 'lorkd')}"
                          + (" (a lorkd teacher folder is loaded by the recipes)" if kind == "lorkd" else ""))
    if kind == "torchscript":
        model = _load_torchscript(path, key)
    else:
        if kind == "state_dict":
            weights, model = path, _architecture(build, factory, kwargs, key)
        elif kind == "monai_bundle":
            weights, model = _bundle(path, network_key, key)
        else:
            weights, model = path, _hub_model(kind, name, kwargs, key)
        state = map_keys(read_state_dict(weights, key), strip_prefix, rename)
        load_weights(model, state, key, str(weights), strict)
    for p in model.parameters():  # not model.requires_grad_: TorchScript modules lack it
        p.requires_grad_(False)
    return model.eval()


def _architecture(build: Any, factory: str | None, kwargs: dict[str, Any], key: str) -> nn.Module:
    if build is None and not factory:
        raise ConfigError(f"{key}: a state_dict needs its architecture: give factory ('package.module:function') "
                          "with kwargs, or a backbone name in teacher.net")
    if factory:
        fn = import_factory(factory, f"{key}.factory")
        try:
            model = fn(**kwargs)
        except Exception as err:  # noqa: BLE001 - the user's factory and kwargs
            raise ConfigError(f"{key}.factory: {factory}(**{kwargs}) failed: {type(err).__name__}: {err}") from err
    else:
        model = build if isinstance(build, nn.Module) else build()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}.factory: {factory or build!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_torchscript(path: Path, key: str) -> nn.Module:
    if not path.is_file():
        raise ConfigError(f"{key}.path: file {path} not found")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{key}.path: {path} is not a TorchScript file ({type(err).__name__})") from err


def _bundle(folder: Path, network_key: str, key: str) -> tuple[Path, nn.Module]:
    """The network of a MONAI bundle folder (built, not loaded) and its weights file."""
    if not folder.is_dir():
        raise ConfigError(f"{key}.path: bundle folder {folder} not found")
    weights = folder / "models" / "model.pt"
    configs = [folder / "configs" / f"{n}.{e}" for n in ("inference", "train") for e in ("json", "yaml", "yml")]
    config = next((c for c in configs if c.is_file()), None)
    if config is None:
        raise ConfigError(f"{key}.path: {folder} is not a MONAI bundle: no configs/inference.json (or .yaml)")
    from monai.bundle import ConfigParser  # seconds to import: only for this source kind

    parser = ConfigParser()
    try:
        parser.read_config(str(config))
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{key}.path: cannot read bundle config {config}: {err}") from err
    parser["bundle_root"] = str(folder)
    if network_key not in parser.get():
        raise ConfigError(f"{key}.network_key: bundle config {config} has no entry {network_key!r} "
                          f"(entries: {', '.join(map(str, parser.get()))})")
    try:
        model = parser.get_parsed_content(network_key)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{key}: building {network_key!r} of {config} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}.network_key: {network_key!r} of {config} is a {type(model).__name__}, not a network")
    return weights, model


def _hub_model(kind: str, name: str | None, kwargs: dict[str, Any], key: str) -> nn.Module:
    if importlib.util.find_spec(kind) is None:
        raise ConfigError(f"{key}.kind: {kind!r} needs the {kind} package, which is not installed "
                          f"(pip install {kind}); or save the model's state dict and use kind: state_dict")
    if not name:
        raise ConfigError(f"{key}.name: give the {kind} model name (e.g. resnet50)")
    try:
        if kind == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights=None, **kwargs)
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{key}.name: {kind} cannot build {name!r}: {err}") from err
