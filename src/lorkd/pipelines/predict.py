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
    """uint8 ``[H, W]`` / ``[H, W, C]`` (volumes: ``[D, H, W(, C)]``) -> float ``[C, *size]`` as the
    expert was trained (card ``spatial_dims``, default 2)."""
    dims = int(card.get("spatial_dims", 2))
    x = torch.from_numpy(np.array(image, dtype=np.float32)).div(255.0)
    x = x[None] if x.ndim == dims else x.movedim(-1, 0)
    channels = card["input_channels"]
    if x.shape[0] != channels:
        x = x.expand(channels, *x.shape[1:]) if x.shape[0] == 1 else x.mean(0, keepdim=True)
    size = card["input_size"]
    size = (size,) * dims if isinstance(size, int) else tuple(size)
    if tuple(x.shape[1:]) != size:
        x = F.interpolate(x[None], size=size, mode="bilinear" if dims == 2 else "trilinear", align_corners=False,
                          antialias=dims == 2)[0]
    norm = card["normalisation"]
    return (x - norm["mean"]) / norm["std"]


@torch.no_grad()
def predict_files(expert_dir: Path, inputs: list[Path], split: str = "test", output: Path | None = None,
                  batch_size: int = 256) -> list[dict[str, Any]]:
    """Probabilities of every input through the expert; printed as CSV or written to ``output``.

    A segmentation expert (card ``task_kind: segmentation``) writes masks instead: see
    :func:`predict_masks` (``output`` is then the folder of the masks)."""
    from ..experts import read_card

    if read_card(expert_dir).get("task_kind") == "segmentation":
        return predict_masks(expert_dir, inputs, output)
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


# ---------------------------------------------------------------------------------------- segmentation
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".h5", ".hdf5")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), path.suffix.lower())


def read_segmentation_input(path: Path, image_key: str = "image") -> tuple[np.ndarray, tuple[float, ...], Any]:
    """``(image float32 [C, *spatial], spacing, geometry)`` of a NIfTI or HDF5 volume or a 2D image.

    ``geometry`` is the NIfTI image (its affine and header are copied to the mask), or ``None``.

    Raises:
        DataError: a missing, unreadable or unsupported file (names it and the field).
    """
    from ..data.volumes import _image_to_array, _pil_open

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = _suffix(path)
    if kind in (".nii", ".nii.gz"):
        import nibabel as nib

        try:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as err:  # nibabel raises several types for bad files
            raise DataError(f"{path}: cannot read the NIfTI file ({err})") from err
        image = np.moveaxis(data, -1, 0) if data.ndim == 4 else data[None]
        zooms = tuple(float(z) for z in img.header.get_zooms()[: image.ndim - 1])
        return np.ascontiguousarray(image), zooms, img
    if kind in (".h5", ".hdf5"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if image_key not in f:
                    raise DataError(f"{path}: missing key {image_key!r} (has {sorted(f.keys())})")
                data = np.asarray(f[image_key][()], dtype=np.float32)
        except DataError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise DataError(f"{path}: cannot read the HDF5 file ({err})") from err
        return data[None], (1.0,) * data.ndim, None
    if kind in IMAGE_SUFFIXES:
        return _image_to_array(_pil_open(str(path), "image")), (1.0, 1.0), None
    raise DataError(f"{path}: unsupported input type {kind!r}; give NIfTI (.nii/.nii.gz), HDF5 (.h5) or image files")


@torch.no_grad()
def segment(model: torch.nn.Module, image: np.ndarray, spacing: tuple[float, ...], card: dict[str, Any]) -> np.ndarray:
    """Mask ``[*spatial]`` (uint8 class indices, the input's own grid) of ``image`` ``[C, *spatial]``:
    preprocessing of the card, sliding-window logits, resampled back to the input's shape, argmax.

    Raises:
        DataError: the input's dimensions or channels do not fit the expert.
    """
    from ..data.segmentation import Preprocess, _fit_channels, preprocess_case
    from ..data.volumes import Case
    from ..engine.inference import sliding_window_logits

    spatial = image.ndim - 1
    if spatial not in (card["spatial_dims"], card["spatial_dims"] + 1):
        raise DataError(f"input of shape {image.shape} ([C, *spatial]) does not fit this {card['spatial_dims']}D expert")
    channels = card["in_channels"]
    if image.shape[0] > channels:
        raise DataError(f"input has {image.shape[0]} channels, the expert takes {channels}")
    pre = card["preprocessing"]
    tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    prep = Preprocess(pre["normalize"], tup(pre["scale"]), tup(pre["target_spacing"]), tup(pre["target_shape"]))
    shape = image.shape[1:]
    case = Case("input", "input", image, np.zeros(shape, np.int64), tuple(spacing), None, "")
    case, _ = preprocess_case(case, prep)
    x = torch.from_numpy(_fit_channels(case.image, channels, card.get("channel_fill", "zeros")).copy())
    inf = card["inference"]
    logits = sliding_window_logits(model, x, inf["roi_size"], inf["overlap"], inf["sw_batch_size"], inf["mode"])
    if tuple(logits.shape[1:]) != tuple(shape):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
        logits = F.interpolate(logits[None], size=tuple(shape), mode=mode, align_corners=False)[0]
    return logits.argmax(0).numpy().astype(np.uint8)


def write_mask(mask: np.ndarray, source: Path, geometry: Any, folder: Path) -> Path:
    """Write ``mask`` beside the name of ``source`` in ``folder``: NIfTI (the input's affine and
    header; identity affine for HDF5 input) for volumes, PNG for 2D images."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = source.name[: -len(_suffix(source))] if source.name.lower().endswith(_suffix(source)) else source.stem
    if mask.ndim == 2 and geometry is None:
        from PIL import Image

        path = folder / f"{stem}_mask.png"
        Image.fromarray(mask).save(path)
        return path
    import nibabel as nib

    if geometry is not None:
        header = geometry.header.copy()
        header.set_data_dtype(np.uint8)
        out = nib.Nifti1Image(mask, geometry.affine, header)
    else:
        out = nib.Nifti1Image(mask, np.eye(4))
    path = folder / f"{stem}_mask.nii.gz"
    nib.save(out, str(path))
    return path


def predict_masks(expert_dir: Path, inputs: list[Path], output: Path | None = None) -> list[dict[str, Any]]:
    """Masks of every input through a segmentation expert, written to ``output`` (a folder,
    default ``./masks``); a CSV line per input (mask path, shape, voxels per class) is printed.

    Raises:
        DataError: a missing or unreadable input, or one that does not fit the expert.
    """
    model = load_expert(expert_dir).eval()
    card = model.card
    folder = Path(output) if output is not None else Path("masks")
    rows = []
    for path in inputs:
        image, spacing, geometry = read_segmentation_input(path)
        mask = segment(model, image, spacing, card)
        written = write_mask(mask, path, geometry, folder)
        counts = np.bincount(mask.reshape(-1), minlength=card["classes"])
        rows.append({"input": path.name, "mask": str(written), "shape": "x".join(map(str, mask.shape)),
                     **{f"voxels_{c}": int(n) for c, n in enumerate(counts)}})
    sys.stdout.write(_format(rows, "csv"))
    return rows
