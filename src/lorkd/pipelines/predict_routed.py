"""``lorkd predict RUN/routed INPUT...``: images without a task id through a routed export
(:mod:`lorkd.pipelines.stages.routed`): the router picks each image's task, that task's expert its
class. Inputs are read and preprocessed as for one expert (:mod:`lorkd.pipelines.predict`; every
model of ``routed/`` takes the same input)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..models.router import ROUTED_CARD, load_routed
from .predict import (
    CLASSIFICATION_SUFFIXES, _device, _spatial_dims, _warn, expand_inputs, load_inputs, preprocess, write_rows,
)


def is_routed(folder: str | Path) -> bool:
    """Whether ``folder`` is a routed export (holds ``routed.json``)."""
    return (Path(folder) / ROUTED_CARD).is_file()


@torch.no_grad()
def predict_routed(folder: Path, inputs: list[Path | str], split: str = "test", output: Path | None = None,
                   batch_size: int = 256, device: str = "cpu", bits: int | None = None) -> list[dict[str, Any]]:
    """Task and class probabilities of every input through ``routed/``; printed as CSV, or written to
    ``output`` (CSV, or JSON when it ends in ``.json``).

    A row holds ``input``, ``task`` (name), ``task_probability`` (softmax of the router's logits at
    that task), ``prediction`` (class index in that task's classes), ``class_name`` when the card
    has the task's class names, and ``p0..pK-1`` (``K``: that task's classes; CSV cells of tasks
    with fewer classes stay empty). Arguments as :func:`lorkd.pipelines.predict.predict_files`.

    Raises:
        DataError: a missing, unreadable or unsupported input, or a malformed ``routed/`` (names it).
    """
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    dev = _device(device)
    model = load_routed(folder).to(dev)
    card = model.card
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
