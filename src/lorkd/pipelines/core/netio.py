"""Saving and loading a network of a run folder: ``model.safetensors`` (its state dict) and
``model.json`` (what rebuilds it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import DataError
from ...fileio import read_json, write_atomic, write_json

WEIGHTS, META = "model.safetensors", "model.json"


def save_network(model: nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (its state dict) and ``model.json`` (``meta``) atomically."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(state, tmp))
    write_json(folder / META, meta)
    return folder


def load_network(folder: Path, build: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network saved by :func:`save_network`: ``build(meta)`` then load the weights.

    Raises:
        DataError: a file is missing or corrupt, or the weights do not fit (names the file).
    """
    meta = read_json(folder / META)
    try:
        model = build(meta)
    except DataError as err:
        raise DataError(f"{folder / META}: {err}") from err
    path = folder / WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the network described in {folder / META}: {err}") from err
    except Exception as err:  # safetensors' own error types for corrupt files
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    return model, meta


def has_network(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / META).is_file()
