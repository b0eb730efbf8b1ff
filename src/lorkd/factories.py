"""Which callables a saved architecture spec may name.

A card (``card.json``), a student's ``student.json`` or a network's ``model.json`` names a
``factory`` that :func:`lorkd.experts.build_architecture` imports and calls. Such files come
from disk, possibly from someone else, so by default only factories under known model
namespaces are accepted (:data:`ALLOWED_NAMESPACES`); anything else needs the user's explicit
``trust_code`` (config key ``trust_code: true`` or the CLI flag ``--trust-code``), given
through :func:`trusted_code` around the load.
"""

from __future__ import annotations

import contextvars
import importlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from .errors import DataError

#: Module prefixes whose callables a spec may name without ``trust_code``: model constructors only
#: (``monai.networks.nets``, not all of ``monai.networks``, whose ``utils`` can write files).
ALLOWED_NAMESPACES = ("monai.networks.nets", "lorkd.models", "torchvision.models", "timm.models", "timm.create_model")

_TRUST = contextvars.ContextVar("lorkd_trust_code", default=False)


@contextmanager
def trusted_code(trust: bool = True) -> Iterator[None]:
    """Within the block, factories outside :data:`ALLOWED_NAMESPACES` are accepted when ``trust``."""
    token = _TRUST.set(bool(trust) or _TRUST.get())
    try:
        yield
    finally:
        _TRUST.reset(token)


def is_allowed(name: str) -> bool:
    """Whether the dotted ``name`` lies under one of :data:`ALLOWED_NAMESPACES`."""
    return any(name == ns or name.startswith(ns + ".") for ns in ALLOWED_NAMESPACES)


def resolve_factory(name: Any, where: str = "architecture spec") -> Callable[..., Any]:
    """Import the callable ``name`` (``"pkg.module.callable"``) after checking it is allowed.

    Raises:
        DataError: ``name`` is not a dotted string, lies outside :data:`ALLOWED_NAMESPACES` while
            ``trust_code`` is off, cannot be imported, or is not callable (names ``where``).
    """
    if not isinstance(name, str) or "." not in name:
        raise DataError(f"{where}: 'factory' must be a dotted name like 'monai.networks.nets.UNet', got {name!r}")
    if not (is_allowed(name) or _TRUST.get()):
        raise DataError(f"{where}: factory {name!r} is outside the known namespaces "
                        f"({', '.join(ALLOWED_NAMESPACES)}); lorkd will not import and call it unless you trust "
                        "the file: set `trust_code: true` in the config or pass --trust-code")
    module_name, _, attr = name.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise DataError(f"{where}: factory {name!r} cannot be imported: {err}") from err
    if not callable(factory):
        raise DataError(f"{where}: factory {name!r} is not callable")
    return factory
