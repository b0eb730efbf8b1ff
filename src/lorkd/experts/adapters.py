"""Adapters as files: one task's low-rank factors (and per-task norm values) of a student, saved
apart from the base model and loaded into any row of a student with the same base.

An adapter folder holds ``adapter.safetensors`` and ``adapter.json``:

* ``adapter.safetensors``: row ``t`` of every per-task tensor of the student, named relative to the
  wrapped model: ``<layer>.A [r, d1]`` and ``<layer>.B [d0, r]`` of each
  :class:`~lorkd.experts.layers.ExpertLayer`, and with ``norm="per_task"`` ``<norm>.weight``,
  ``.bias``, ``.running_mean``, ``.running_var`` ``[C]`` and ``.num_batches_tracked`` ``[]`` of each
  :class:`~lorkd.experts.layers.TaskBatchNorm`. Nothing of the shared model is in it.
* ``adapter.json``: the task (name, id), the number of tasks, alpha, norm, per layer its type,
  weight shape, rank, alpha and factor shapes, per norm its tensor shapes, the sha256 of the
  tensors file's content and the **base fingerprint**: the sha256 of every shared tensor of the
  student (its state dict without the per-task tensors; names, dtypes, shapes and bytes).

:func:`load_adapter` writes the tensors into row ``task`` of the stacked parameters in place
(under ``torch.no_grad``), which bumps their version counters, so the merged weights
:class:`~lorkd.experts.layers.ExpertLayer` caches for inference are rebuilt on the next forward.
It refuses an adapter of another base (a different fingerprint), or whose layers, ranks, alpha or
shapes differ from the student's, naming the layer. Both files are written atomically
(:func:`lorkd.fileio.write_atomic`): the tensors first, then the JSON that carries their digest, so
a reader never pairs a JSON with the tensors of another save.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import DataError
from ..fileio import read_json, write_atomic, write_json
from .layers import ExpertLayer, TaskBatchNorm
from .model import ExpertModel

ADAPTER_WEIGHTS, ADAPTER_META = "adapter.safetensors", "adapter.json"
ADAPTER_FORMAT = 1
_NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

__all__ = ["ADAPTER_META", "ADAPTER_WEIGHTS", "base_fingerprint", "list_adapters", "load_adapter", "read_adapter",
           "save_adapter", "save_adapters", "task_tensors", "tensors_digest"]


def expert_model(model: nn.Module) -> ExpertModel:
    """``model`` itself when it is an :class:`ExpertModel`, else its one ``ExpertModel`` submodule
    (e.g. the ``backbone`` of a multi-task student).

    Raises:
        ValueError: ``model`` holds no ``ExpertModel``, or more than one.
    """
    if isinstance(model, ExpertModel):
        return model
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertModel)]
    if len(found) != 1:
        what = "no ExpertModel (build one with lorkd.add_experts)" if not found else \
            f"{len(found)} ExpertModels ({', '.join(n for n, _ in found)}); pass the one to use"
        raise ValueError(f"{type(model).__name__} holds {what}")
    return found[0][1]


def task_tensors(student: ExpertModel) -> dict[str, Tensor]:
    """Every per-task tensor of ``student``, stacked over the tasks (dim 0 is the task), by name
    relative to the wrapped model: ``<layer>.A [T, r, d1]``, ``<layer>.B [T, d0, r]`` and, for
    per-task norms, ``<norm>.<weight|bias|running_mean|running_var> [T, C]``,
    ``<norm>.num_batches_tracked [T]``."""
    out: dict[str, Tensor] = {}
    for name, module in student.model.named_modules():
        keys = ("A", "B") if isinstance(module, ExpertLayer) else _NORM_KEYS if isinstance(module, TaskBatchNorm) else ()
        for key in keys:
            value = getattr(module, key)
            if value is not None:
                out[f"{name}.{key}" if name else key] = value
    return out


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over ``tensors`` in name order: each name, dtype, shape and raw bytes (bit-exact)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def base_fingerprint(student: nn.Module) -> str:
    """sha256 of the shared tensors of ``student`` (its :class:`ExpertModel`'s state dict without
    the per-task tensors of :func:`task_tensors`): equal exactly when the base weights, shared norms
    and their statistics are bit-identical."""
    st = expert_model(student)
    owned = {f"model.{name}" for name in task_tensors(st)}
    return tensors_digest({k: v for k, v in st.state_dict().items() if k not in owned})


def save_adapter(student: nn.Module, task: int, folder: str | Path, name: str | None = None) -> Path:
    """Write task ``task``'s factors (and per-task norm values) of ``student`` to ``folder`` as
    ``adapter.safetensors`` + ``adapter.json`` (see the module docstring); returns the folder.

    Args:
        student: an :class:`ExpertModel`, or a module holding one (a multi-task student: its
            heads are not part of the adapter).
        task: the row to save, in ``[0, T)``.
        folder: created if needed; existing adapter files are replaced atomically.
        name: the task's name, recorded in ``adapter.json`` (default: ``student.task_names[task]``
            where the student carries its tasks' names, as a run's multi-task student does; else
            ``"task_<task>"``).

    Raises:
        ValueError: ``task`` out of range, or ``student`` holds no (or several) ``ExpertModel``.
    """
    st = expert_model(student)
    st._check_task(task)
    name = name or _task_names(student, st.num_tasks)[task]
    folder = Path(folder)
    rows = {n: t[task].detach().to("cpu").contiguous().clone() for n, t in task_tensors(st).items()}
    layers = {n: {"type": type(layer.base).__name__, "weight_shape": list(layer.base.weight.shape), "rank": layer.rank,
                  "alpha": layer.alpha, "A": list(layer.A.shape[1:]), "B": list(layer.B.shape[1:])}
              for n, layer in st.expert_layers()}
    norms = {n: {k: list(getattr(m, k).shape[1:]) for k in _NORM_KEYS if getattr(m, k) is not None}
             for n, m in st.model.named_modules() if isinstance(m, TaskBatchNorm)}
    meta = {"format": ADAPTER_FORMAT, "kind": "lorkd-adapter", "task": name, "task_id": task,
            "num_tasks": st.num_tasks, "alpha": st.config.alpha, "norm": st.config.norm, "layers": layers,
            "norms": norms, "sha256": tensors_digest(rows),
            "base": {"sha256": base_fingerprint(st), "note": "sha256 of the student's shared tensors"}}
    write_atomic(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(rows, tmp))
    write_json(folder / ADAPTER_META, meta)
    return folder


def save_adapters(student: nn.Module, root: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Every task's adapter of ``student``, each in ``root/<name>`` (``names[t]``; default: the
    student's ``task_names`` where it carries them, as a run's multi-task student does, else
    ``task_<t>``); returns ``{name: folder}``.

    Raises:
        ValueError: ``names`` does not hold one unique name per task.
    """
    st = expert_model(student)
    names = names or _task_names(student, st.num_tasks)
    if len(names) != st.num_tasks or len(set(names)) != len(names):
        raise ValueError(f"names: give {st.num_tasks} unique task names, got {names}")
    return {n: save_adapter(st, t, Path(root) / n, name=n) for t, n in enumerate(names)}


def _task_names(student: nn.Module, num_tasks: int) -> list[str]:
    """``student.task_names`` when it holds one name per task, else ``task_<t>``."""
    names = getattr(student, "task_names", None)
    return list(names) if names is not None and len(names) == num_tasks else [f"task_{t}" for t in range(num_tasks)]


def read_adapter(folder: str | Path) -> dict[str, Any]:
    """The ``adapter.json`` of an adapter folder.

    Raises:
        DataError: the file is missing, not JSON, or not a lorkd adapter (names the file).
    """
    path = Path(folder) / ADAPTER_META
    meta = read_json(path)
    if meta.get("kind") != "lorkd-adapter" or meta.get("format") != ADAPTER_FORMAT:
        raise DataError(f"{path}: not a lorkd adapter of format {ADAPTER_FORMAT} (kind {meta.get('kind')!r}, "
                        f"format {meta.get('format')!r})")
    missing = [k for k in ("task_id", "layers", "norms", "alpha", "sha256", "base") if k not in meta]
    if missing:
        raise DataError(f"{path}: missing field(s) {missing}")
    return meta


def list_adapters(root: str | Path) -> dict[str, dict[str, Any]]:
    """``{folder name: adapter.json}`` of every adapter folder directly under ``root``, sorted by name.

    Raises:
        DataError: ``root`` is not a folder, or an ``adapter.json`` there is not a lorkd adapter.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    return {p.name: read_adapter(p) for p in sorted(root.iterdir()) if (p / ADAPTER_META).is_file()}


def load_adapter(student: nn.Module, folder: str | Path, task: int | None = None, check_base: bool = True) -> int:
    """Write the adapter in ``folder`` into row ``task`` of ``student`` (in place; the row's
    previous factors and per-task norm values are replaced, every other row and the shared
    weights stay bit-identical). Returns the row written.

    Args:
        student: an :class:`ExpertModel`, or a module holding one.
        folder: a folder written by :func:`save_adapter`.
        task: the row to write (default: the row the adapter was saved from); any row may take any
            task's adapter (swapping experts on one base).
        check_base: refuse an adapter saved from a student whose shared weights differ.

    Raises:
        ValueError: ``task`` out of range for ``student``.
        DataError: missing or corrupt files, tensors that do not match their JSON, another base
            (both fingerprints named), layers or norms missing on either side, or a rank, alpha
            or shape that differs (each names the layer).
    """
    folder = Path(folder)
    meta = read_adapter(folder)
    st = expert_model(student)
    row = int(meta["task_id"]) if task is None else task
    st._check_task(row)
    _check_layout(st, meta, folder / ADAPTER_META)
    if check_base:
        own = base_fingerprint(st)
        if own != meta["base"].get("sha256"):
            raise DataError(f"{folder / ADAPTER_META}: the adapter was saved from another base model (base "
                            f"fingerprint {str(meta['base'].get('sha256'))[:16]}..., this student's {own[:16]}...); "
                            "its shared weights must be bit-identical: load it onto the student it was saved from "
                            "(or pass check_base=False to accept a different base)")
    tensors = _read_tensors(folder, meta)
    targets = task_tensors(st)
    _check_tensors(tensors, targets, folder / ADAPTER_WEIGHTS)
    with torch.no_grad():  # a view of the parameter: bumps its version counter (merged-weight caches rebuild)
        for name, value in tensors.items():
            targets[name][row].copy_(value)
    return row


def _check_layout(st: ExpertModel, meta: dict[str, Any], path: Path) -> None:
    """The adapter's layers and norms match ``st``'s by name, type, weight shape, rank and alpha."""
    own = {n: layer for n, layer in st.expert_layers()}
    saved = meta["layers"]
    only_saved, only_own = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
    if only_saved or only_own:
        raise DataError(f"{path}: the adapter's layers differ from the student's: layers only in the adapter "
                        f"{only_saved[:8]}, layers with experts only in the student {only_own[:8]}")
    for name, info in saved.items():
        layer = own[name]
        mine = {"type": type(layer.base).__name__, "weight_shape": list(layer.base.weight.shape), "rank": layer.rank,
                "alpha": layer.alpha}
        diffs = [f"{k} {info.get(k)} in the adapter, {v} in the student" for k, v in mine.items() if info.get(k) != v]
        if diffs:
            raise DataError(f"{path}: layer {name!r}: " + "; ".join(diffs))
    norms = {n for n, m in st.model.named_modules() if isinstance(m, TaskBatchNorm)}
    if set(meta["norms"]) != norms:
        raise DataError(f"{path}: per-task norms differ: in the adapter {sorted(meta['norms'])[:8]}, in the student "
                        f"{sorted(norms)[:8]} (was one saved with norm='shared' and the other 'per_task'?)")


def _read_tensors(folder: Path, meta: dict[str, Any]) -> dict[str, Tensor]:
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own error types for corrupt files
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    if tensors_digest(tensors) != meta["sha256"]:
        raise DataError(f"{path}: its tensors are not the ones {ADAPTER_META} describes (sha256 differs): the two "
                        "files come from different saves")
    return tensors


def _check_tensors(tensors: dict[str, Tensor], targets: dict[str, Tensor], path: Path) -> None:
    missing, extra = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or extra:
        raise DataError(f"{path}: tensors missing {missing[:8]}, unexpected {extra[:8]}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(targets[name].shape[1:]):
            raise DataError(f"{path}: {name!r} has shape {tuple(value.shape)}, the student's row is "
                            f"{tuple(targets[name].shape[1:])}")
