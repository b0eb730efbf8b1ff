"""``lorkd predict RUN/routed INPUT...``: images without a task id through a routed export
(:mod:`lorkd.pipelines.stages.routed`): the router picks each image's task, that task's expert its
class. Inputs are read and preprocessed as for one expert (:mod:`lorkd.pipelines.predict`; every
model of ``routed/`` takes the same input).

A segmentation export (``task_kind: segmentation``) routes each volume or image once: the router
sees it as ``routed.json`` ``router_input`` says (:func:`~lorkd.models.router.router_view`), and the
chosen task's expert writes its mask as ``lorkd predict`` of that expert would
(:func:`predict_routed_masks`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.segmentation import fit_channels, read_input_image, reorient
from ..errors import DataError
from ..models.router import ROUTED_CARD, RoutedExperts, load_routed, router_view
from .predict import (
    CLASSIFICATION_SUFFIXES, _device, _format, _spatial_dims, _warn, expand_inputs, label_lookup, load_inputs,
    mask_file, mask_inputs, preprocess, write_rows,
)


def is_routed(folder: str | Path) -> bool:
    """Whether ``folder`` is a routed export (holds ``routed.json``)."""
    return (Path(folder) / ROUTED_CARD).is_file()


@torch.no_grad()
def predict_routed(folder: Path, inputs: list[Path | str], split: str = "test", output: Path | None = None,
                   batch_size: int = 256, device: str = "cpu", bits: int | None = None,
                   class_indices: bool = False) -> list[dict[str, Any]]:
    """Task and class probabilities of every input through ``routed/``; printed as CSV, or written to
    ``output`` (CSV, or JSON when it ends in ``.json``).

    A row holds ``input``, ``task`` (name), ``task_probability`` (softmax of the router's logits at
    that task), ``prediction`` (class index in that task's classes), ``class_name`` when the card
    has the task's class names, and ``p0..pK-1`` (``K``: that task's classes; CSV cells of tasks
    with fewer classes stay empty). Arguments as :func:`lorkd.pipelines.predict.predict_files`.
    A segmentation export writes masks instead (:func:`predict_routed_masks`; ``output``: their folder).

    Raises:
        DataError: a missing, unreadable or unsupported input, or a malformed ``routed/`` (names it).
    """
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    dev = _device(device)
    model = load_routed(folder).to(dev)
    card = model.card
    if card.get("task_kind") == "segmentation":
        return predict_routed_masks(model, Path(folder), inputs, output, dev, class_indices)
    missing = [k for k in ("input_channels", "input_size", "normalisation") if k not in card]
    if missing:
        raise DataError(f"{Path(folder) / ROUTED_CARD}: missing {', '.join(missing)} (as `lorkd export` writes them)")
    items = load_inputs(expand_inputs(inputs, CLASSIFICATION_SUFFIXES), split, _spatial_dims(card), bits)
    notes: dict[str, list[str]] = {"channels": [], "resized": []}
    rows = []
    step = batch_size if card["input_size"] else 1
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        x = torch.stack([preprocess(img, card, name, notes) for name, img in chunk]).to(dev)
        task_probs = torch.softmax(model.router(x).float(), dim=1)
        tasks, logits = model(x)
        for (name, _), t, p_task, out in zip(chunk, tasks.tolist(), task_probs, logits):
            task = model.tasks[t]
            p = torch.softmax(out.float(), dim=0).cpu().numpy()
            names = (card.get("class_names") or {}).get(task)
            label = {"class_name": names[int(p.argmax())]} if names else {}
            rows.append({"input": name, "task": task, "task_probability": float(p_task[t]),
                         "prediction": int(p.argmax()), **label, **{f"p{c}": float(v) for c, v in enumerate(p)}})
    _warn(notes, card)
    write_rows(rows, output)
    return rows


def route_file(model: RoutedExperts, image: np.ndarray, affine: np.ndarray | None, dev: torch.device) -> tuple[int, float]:
    """``(task id, its router probability)`` of one case ``[C, *spatial]`` as read: turned to
    ``router_input.orientation`` (a 3D NIfTI), channels fitted, :func:`router_view`, router argmax."""
    ri = model.card["router_input"]
    if ri.get("orientation") and affine is not None and image.ndim == 4:
        image = reorient(image, affine, to=ri["orientation"], channels_first=True)[0]
    if image.ndim - 1 != ri["spatial_dims"]:
        raise DataError(f"input of shape {list(image.shape)} ([C, *spatial]) does not fit the router, which takes "
                        f"{ri['spatial_dims']}D cases")
    x = torch.from_numpy(np.ascontiguousarray(fit_channels(image, ri["channels"], ri["channel_fill"]), dtype=np.float32))
    probs = torch.softmax(model.router(router_view(x, ri["size"])[None].to(dev)).float(), dim=1)[0]
    task = int(probs.argmax())
    return task, float(probs[task])


def predict_routed_masks(model: RoutedExperts, folder: Path, inputs: list[Path | str], output: Path | None,
                         dev: torch.device, class_indices: bool = False) -> list[dict[str, Any]]:
    """Masks of every input through a routed segmentation export: each case routed once
    (:func:`route_file`), then segmented by that task's expert and written into ``output`` (default
    ``./masks``) as :func:`lorkd.pipelines.predict.predict_masks` does; a CSV line per input with
    ``task`` and ``task_probability`` is printed.

    Raises:
        DataError: a missing or unreadable input, one that does not fit the router or the expert, or
            a ``routed.json`` without ``router_input`` (names it).
    """
    if "router_input" not in model.card:
        raise DataError(f"{folder / ROUTED_CARD}: a segmentation export needs 'router_input' (as `lorkd export` "
                        "writes it)")
    out = Path(output) if output is not None else Path("masks")
    rows = []
    for path in mask_inputs(inputs, out):
        read = read_input_image(path)
        try:
            task, p_task = route_file(model, read.image, read.affine, dev)
        except DataError as err:
            raise DataError(f"{path}: {err}") from err
        expert = model.experts[task]
        lookup = label_lookup(expert.card, folder / model.card["experts"][model.tasks[task]], class_indices)
        row = mask_file(expert, expert.card, path, dev, lookup, out, read)
        rows.append({"input": row.pop("input"), "task": model.tasks[task], "task_probability": p_task, **row})
    sys.stdout.write(_format(rows, "csv"))
    return rows
