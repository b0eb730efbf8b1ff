"""``lorkd predict``: run an exported expert on image files or a ``.npz`` and report class
probabilities. Inputs are preprocessed as the expert's card says (channels, size, scaling)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.medmnist import load_npz_task
from ..errors import DataError
from ..experts import load_expert

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp"}


def load_inputs(paths: list[Path], split: str) -> list[tuple[str, np.ndarray]]:
    """``(name, uint8 image [H, W] or [H, W, C])`` for every image file and every image of the
    ``split`` of every ``.npz``.

    Raises:
        DataError: a file is missing, of an unknown type, or unreadable (names it).
    """
    from PIL import Image, UnidentifiedImageError

    items = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        if path.suffix.lower() == ".npz":
            task = load_npz_task(path)
            if split not in task.images:
                raise DataError(f"{path}: has no split {split!r}")
            items += [(f"{path.name}[{split}][{i}]", img) for i, img in enumerate(task.images[split])]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                with Image.open(path) as img:
                    img.load()
                    array = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
            except (UnidentifiedImageError, OSError) as err:
                raise DataError(f"{path}: cannot read the image ({err})") from err
            items.append((path.name, array))
        else:
            raise DataError(f"{path}: unsupported input type {path.suffix!r}; give images or .npz files")
    return items


def preprocess(image: np.ndarray, card: dict[str, Any]) -> torch.Tensor:
    """uint8 ``[H, W]`` / ``[H, W, C]`` -> float ``[C, S, S]`` as the expert was trained."""
    x = torch.from_numpy(np.array(image, dtype=np.float32)).div(255.0)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    channels = card["input_channels"]
    if x.shape[0] != channels:
        x = x.expand(channels, -1, -1) if x.shape[0] == 1 else x.mean(0, keepdim=True)
    size = card["input_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[1:]) != size:
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    norm = card["normalisation"]
    return (x - norm["mean"]) / norm["std"]


@torch.no_grad()
def predict_files(expert_dir: Path, inputs: list[Path], split: str = "test", output: Path | None = None,
                  batch_size: int = 256) -> list[dict[str, Any]]:
    """Probabilities of every input through the expert; printed as CSV or written to ``output``."""
    model = load_expert(expert_dir).eval()
    card = model.card
    items = load_inputs(inputs, split)
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = torch.stack([preprocess(img, card) for _, img in chunk])
        probs = torch.softmax(model(x), dim=1).numpy()
        for (name, _), p in zip(chunk, probs):
            rows.append({"input": name, "prediction": int(p.argmax()), **{f"p{c}": float(v) for c, v in enumerate(p)}})
    text = _format(rows, "json" if output is not None and output.suffix == ".json" else "csv")
    if output is None:
        sys.stdout.write(text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    return rows


def _format(rows: list[dict[str, Any]], kind: str) -> str:
    if kind == "json":
        return json.dumps(rows, indent=1)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["input"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
