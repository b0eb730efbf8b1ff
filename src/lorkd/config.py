"""Typed configuration: YAML in, validated dataclasses out, errors that name the key.

A config is a tree of dataclasses (see :mod:`lorkd.pipelines.schema` for the recipes'
trees). :func:`from_dict` builds one from plain data, checking every key and type, so a typo
or a wrong type fails at load time with the dotted path of the key (``student.rnak``).
``--set a.b=value`` overrides are parsed as YAML scalars and applied before validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .errors import ConfigError
from .fileio import write_atomic

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3``, ``1E-4``, ``5e+2`` as floats.

    PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed exponent, so
    ``lr: 1e-3`` would otherwise be the string ``"1e-3"``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with scientific notation read as numbers (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place.

    Raises:
        ConfigError: an override has no ``=`` or walks through a key that is not a mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. student.train.epochs=5")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(keys[:depth + 1])} is not a mapping")
        try:
            node[keys[-1]] = parse_yaml(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from err
    return data


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and types recursively.

    Raises:
        ConfigError: unknown key (with a suggestion), missing required key, or a value of the
            wrong type/choice; the message starts with the dotted key.
    """
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise unknown_key(path, key, fields)
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(hints[name], _over_default(field, data[name]), _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required key is missing")
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        if inspect.signature(validate).parameters:
            validate(path)  # names the key itself
        else:
            try:
                validate()
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from err
    return obj


def _over_default(field: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a section whose default is a configured instance (``default_factory``,
    e.g. segmentation's ``train`` with batches of 8) lays the given keys over that default, at every
    depth, so ``train: {epochs: 20}`` keeps the section's own batch size and optimiser instead of
    falling back to the class defaults."""
    if not isinstance(value, dict) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    return _deep_merge(to_dict(default), value) if dataclasses.is_dataclass(default) else value


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (for YAML dumps and reports)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def write_config(path: str | Path, cfg: Any) -> Path:
    """Write a config as YAML (atomically), in the form :func:`load_yaml` reads back."""
    data = to_dict(cfg)
    if getattr(cfg, "RECIPE", None):
        data = {"recipe": cfg.RECIPE, **data}
    text = yaml.safe_dump(data, sort_keys=False)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        shaped = [a for a in options if _shape_of(a) == _shape_of(type(value))] if isinstance(value, (list, dict)) else []
        if len(shaped) == 1:  # one option of the value's shape (a list, a mapping): its own errors, dotted keys
            options = shaped
        if len(options) == 1:  # Optional[X]: X's own error, with its dotted key
            return _convert(options[0], value, path)
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError as err:
                errors.append(str(err).split(": ", 1)[-1])
        raise ConfigError(f"{path}: {value!r} fits none of: {'; '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        converted = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        key_t, val_t = args or (Any, Any)
        return {_convert(key_t, k, f"{path}.{k}"): _convert(val_t, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {hint!r}")  # a programming error in a schema


def _shape_of(hint: Any) -> str | None:
    """``"list"`` for list/tuple types, ``"mapping"`` for dicts and dataclasses, else ``None``."""
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        return "list"
    return "mapping" if origin is dict or dataclasses.is_dataclass(hint) else None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def unknown_key(path: str, key: Any, known: Iterable[str]) -> ConfigError:
    """The error for ``key`` not among ``known`` under ``path``: ``"<path>.<key>: unknown key (did
    you mean '<closest>'?)"``, or with the known keys listed when none is close."""
    known = list(known)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{_join(path, key)}: unknown key{hint}")


def check(condition: bool, path: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"{path}: {message}"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{path}: {message}")
