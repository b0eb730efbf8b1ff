"""Saving and loading students and exported experts.

A *student* is saved as a folder with ``weights.safetensors`` (every tensor of its state
dict) and ``student.json`` (tasks, ranks, alpha, targets, norm, layout, the layers with
experts and the base architecture). An *expert* is a plain model: ``expert.safetensors`` holds its plain
state dict, loadable with ``safetensors.torch.load_file`` into a fresh instance of its
architecture with ``load_state_dict(strict=True)``; ``card.json`` describes it.

An *architecture* is a JSON-able spec ``{"factory": "package.module.callable", "kwargs": {...}}``
that builds the plain model, e.g. ``{"factory": "monai.networks.nets.resnet18",
"kwargs": {"spatial_dims": 2, "n_input_channels": 1, "num_classes": 2}}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DataError
from ..factories import resolve_factory
from ..fileio import read_json, write_atomic, write_json
from .layers import LAYOUTS
from .model import ExpertConfig, ExpertModel, add_experts

STUDENT_WEIGHTS, STUDENT_META = "weights.safetensors", "student.json"
EXPERT_WEIGHTS, EXPERT_CARD = "expert.safetensors", "card.json"
FORMAT_VERSION = 1


def build_architecture(spec: dict[str, Any], where: str = "architecture spec") -> nn.Module:
    """Build a plain model from ``{"factory": "pkg.mod.callable", "kwargs": {...}}``.

    The factory must lie under :data:`lorkd.factories.ALLOWED_NAMESPACES` unless the call runs
    inside :func:`lorkd.factories.trusted_code` (the user's ``trust_code``).

    Raises:
        DataError: the spec lacks ``factory``, names something outside the known namespaces
            (without ``trust_code``) or that cannot be imported; ``where`` names the file.
    """
    if not isinstance(spec, dict) or "factory" not in spec:
        raise DataError(f"{where}: architecture spec must be a dict with a 'factory' key, got {spec!r}")
    return resolve_factory(spec["factory"], where)(**spec.get("kwargs", {}))


def save_student(student: ExpertModel, folder: str | Path, architecture: dict[str, Any] | None = None) -> Path:
    """Write ``student`` to ``folder`` (created if needed); returns the folder.

    ``architecture`` (see module docstring) lets :func:`load_student` rebuild the model
    without being handed one.
    """
    folder = Path(folder)
    meta = {
        "format": FORMAT_VERSION,
        "config": student.config.to_json(),
        "layers": {name: layer.rank for name, layer in student.expert_layers()},
        "architecture": architecture,
    }
    write_atomic(folder / STUDENT_WEIGHTS, lambda p: save_file(_contiguous(student.state_dict()), p))
    write_json(folder / STUDENT_META, meta)
    return folder


def load_student(folder: str | Path, model: nn.Module | None = None) -> ExpertModel:
    """Rebuild a student saved by :func:`save_student`.

    Args:
        folder: the saved folder.
        model: a fresh instance of the base architecture; if ``None``, it is built from the
            saved architecture spec.

    Raises:
        DataError: a file is missing or corrupt, the metadata lacks a field, or the weights
            do not fit the architecture (the message names the file and the keys), or the saved
            layout is not one of ``LAYOUTS``.
    """
    folder = Path(folder)
    meta = read_json(folder / STUDENT_META)
    for key in ("config", "layers"):
        if key not in meta:
            raise DataError(f"{folder / STUDENT_META}: missing field {key!r}")
    if model is None:
        if not meta.get("architecture"):
            raise DataError(f"{folder / STUDENT_META}: no 'architecture' saved; pass the base model as model=")
        model = build_architecture(meta["architecture"], str(folder / STUDENT_META))
    cfg = meta["config"]
    layout = cfg.get("layout", "auto")
    if layout not in LAYOUTS:
        raise DataError(f"{folder / STUDENT_META}: config.layout {layout!r} is not one of {LAYOUTS} "
                        f"(a layout of an earlier lorkd: train the student again)")
    # Rebuild with exactly the saved layers and ranks, whatever the original targets were.
    student = add_experts(model, cfg["num_tasks"], rank=dict(meta["layers"]), alpha=cfg["alpha"],
                          targets=list(meta["layers"]), norm=cfg["norm"], layout=layout)
    student.config = ExpertConfig(cfg["num_tasks"], cfg["rank"], cfg["alpha"], cfg["targets"], cfg["norm"], layout)
    _load_into(student, folder / STUDENT_WEIGHTS)
    return student


def save_expert(model: nn.Module, folder: str | Path, architecture: dict[str, Any] | None = None,
                card: dict[str, Any] | None = None) -> Path:
    """Write a plain model (e.g. ``student.extract(t)``) as ``expert.safetensors`` + ``card.json``.

    The card holds ``architecture`` and whatever ``card`` adds (task, classes, metrics, ...).
    """
    folder = Path(folder)
    full_card = {"format": FORMAT_VERSION, **(card or {}), "architecture": architecture,
                 "parameters": sum(p.numel() for p in model.parameters())}
    write_atomic(folder / EXPERT_WEIGHTS, lambda p: save_file(_contiguous(model.state_dict()), p))
    write_json(folder / EXPERT_CARD, full_card)
    return folder


def load_expert(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load an expert saved by :func:`save_expert` (into ``model``, or one built from its card).

    Raises:
        DataError: missing or corrupt files, no architecture to build, or mismatched weights.
    """
    folder = Path(folder)
    card = read_json(folder / EXPERT_CARD)
    if model is None:
        if not card.get("architecture"):
            raise DataError(f"{folder / EXPERT_CARD}: no 'architecture' saved; pass the model as model=")
        model = build_architecture(card["architecture"], str(folder / EXPERT_CARD))
    _load_into(model, folder / EXPERT_WEIGHTS)
    model.card = card
    return model


def read_card(folder: str | Path) -> dict[str, Any]:
    """The ``card.json`` of an exported expert."""
    return read_json(Path(folder) / EXPERT_CARD)


def _load_into(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    missing, unexpected = _key_diff(model.state_dict(), state)
    if missing or unexpected:
        raise DataError(f"{path}: weights do not fit the architecture; missing keys {missing[:5]}, "
                        f"unexpected keys {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the architecture: {err}") from err


def _key_diff(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in state.items()}
