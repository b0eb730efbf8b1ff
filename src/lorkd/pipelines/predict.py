"""``lorkd predict``: run an exported expert on image files, folders, globs, ``.npy`` or ``.npz``
files and report class probabilities (with class names when the card has them). Inputs are
preprocessed as the expert's card says (channels, size, normalisation); pixel values are scaled by
type: uint8 / 255, uint16 / 65535 (``--bits N``: / 2**N - 1), float kept when in [0, 1] (anything
else is an error: nothing is clipped). Resizing, channel conversion and 16-bit images whose values
fit fewer bits are logged as warnings."""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..data.segmentation import (
    IMAGE_SUFFIXES as SEGMENTATION_IMAGE_SUFFIXES, INPUT_SUFFIXES, Case, InputImage, Preprocess, fit_channels,
    input_suffix, preprocess_case, read_input_image, reorient, series_folders,
)
from ..engine.inference import sliding_window_logits
from ..errors import DataError
from ..experts import load_expert, read_card
from ..experts.io import EXPERT_CARD
from .core.runtime import resolve_device

log = logging.getLogger("lorkd")

IMAGE_SUFFIXES = set(SEGMENTATION_IMAGE_SUFFIXES)  # 2D images: the suffixes the segmentation reader takes
CLASSIFICATION_SUFFIXES = IMAGE_SUFFIXES | {".npy", ".npz"}


def expand_inputs(inputs: Iterable[str | Path], suffixes: Iterable[str], series: bool = False) -> list[Path]:
    """Files as given; a folder gives its files with one of ``suffixes`` (sorted, not recursive); a
    path that does not exist but holds ``*``, ``?`` or ``[`` is a glob pattern (sorted matches).
    With ``series``, a folder without such files that holds DICOM slices is one input (a series),
    and a folder of such folders gives each (:func:`~lorkd.data.segmentation.series_folders`).

    Raises:
        DataError: a missing file, a folder without such files, or a pattern that matches nothing.
    """
    suffixes = tuple(s.lower() for s in suffixes)
    known = lambda p: p.is_file() and p.name.lower().endswith(suffixes)  # noqa: E731
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if known(p)) or (series_folders(path) if series else [])
            if not found:
                raise DataError(f"{path}: folder holds no input files ({', '.join(sorted(suffixes))})")
            paths += found
        elif not path.exists() and glob.has_magic(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item)) if known(Path(p)))
            if not found:
                raise DataError(f"{item}: pattern matches no input files ({', '.join(sorted(suffixes))})")
            paths += found
        elif not path.is_file():
            raise DataError(f"{path}: file not found")
        else:
            paths.append(path)
    return paths


def to_unit_range(array: np.ndarray, name: str, bits: int | None = None,
                  shallow: list[tuple[str, int]] | None = None) -> np.ndarray:
    """Pixel values -> float32 in [0, 1] by type: uint8 / 255, uint16 / 65535, bool as 0/1, float
    kept. A signed or wider integer image whose values fit 16 bits is read as 16-bit (warned).
    ``bits`` (e.g. 12 for 12-bit data in 16-bit files): integer images other than uint8 are divided
    by ``2**bits - 1`` instead.

    A 16-bit image read as such whose values fit 14 bits or fewer is probably shallower data in a
    16-bit file (it comes out dark): ``(name, depth)`` is appended to ``shallow``, or warned when
    ``shallow`` is None.

    Raises:
        DataError: float values outside [0, 1] or not finite, integers beyond 16 bits (``bits``) or
            negative, or another dtype (names ``name``, the dtype and the range; nothing is clipped).
    """
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.float32)
    if kind == "u" and array.dtype.itemsize == 1:
        return array.astype(np.float32) / 255.0
    if kind in "ui":
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        top = 2 ** (bits or 16) - 1
        if lo < 0 or hi > top:
            hint = f", beyond --bits {bits} (max {top})" if bits else "; give 8-bit or 16-bit unsigned images, or floats in [0, 1]"
            raise DataError(f"{name}: integer image of dtype {array.dtype} with values in [{lo}, {hi}]{hint}")
        if bits is None and (kind != "u" or array.dtype.itemsize != 2):
            log.warning("predict: %s: %s image read as 16-bit (values / 65535)", name, array.dtype)
        depth = next((d for d in (8, 10, 12, 14) if hi < 2 ** d), None)
        if bits is None and depth is not None:
            if shallow is None:
                _warn_shallow([(name, depth)])
            else:
                shallow.append((name, depth))
        return array.astype(np.float32) / top
    if kind == "f":
        if not np.isfinite(array).all():
            raise DataError(f"{name}: float image holds NaN or infinite values")
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{name}: float image with values in [{lo:.4g}, {hi:.4g}]; float images must be in [0, 1] "
                            "(scale them first; nothing is clipped)")
        return array.astype(np.float32)
    raise DataError(f"{name}: images of dtype {array.dtype} are not supported")


def _warn_shallow(shallow: list[tuple[str, int]]) -> None:
    """One warning for the 16-bit inputs whose values fit fewer bits (``(name, depth)`` each)."""
    if shallow:
        depth = max(d for _, d in shallow)
        names = ", ".join(n for n, _ in shallow[:5]) + (f" and {len(shallow) - 5} more" if len(shallow) > 5 else "")
        log.warning("predict: %d 16-bit input(s) hold values that fit %d bits, divided by 65535 they come out dark; "
                    "if they are %d-bit data, pass --bits %d: %s", len(shallow), depth, depth, depth, names)


def read_image(path: Path) -> np.ndarray:
    """A 2D image file as an array of its own dtype, ``[H, W]`` or ``[H, W, C]`` (C = 3).

    Palette, alpha, CMYK and other colour modes are converted to RGB (warned); 1-bit to 8-bit gray.

    Raises:
        DataError: the file cannot be read as an image (names it).
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("L", "RGB", "F") or mode.startswith("I"):
                return np.asarray(img)
            target = "L" if mode in ("1", "LA", "La") else "RGB"
            if mode != "1":
                log.warning("predict: %s: converted image mode %s to %s", path, mode, target)
            return np.asarray(img.convert(target))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read the image ({err})") from err


def load_inputs(paths: list[Path], split: str, spatial_dims: int = 2,
                bits: int | None = None) -> list[tuple[str, np.ndarray]]:
    """``(name, image [*spatial] or [*spatial, C] in [0, 1], float32)`` for every image file, every
    ``.npy`` array (a stack ``[N, *spatial]`` / ``[N, *spatial, C]`` gives ``N`` images named
    ``path[i]``) and every image of the ``split`` of every ``.npz`` (scaled by
    :func:`to_unit_range` with ``bits``; one warning for 16-bit inputs that fit fewer bits).

    Raises:
        DataError: a file is missing, of an unknown type, unreadable, of an unsupported shape or
            value range (names it).
    """
    items, shallow = [], []
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            images = _npz_images(path, split, bits, shallow)
            items += [(f"{path}[{split}][{i}]", image) for i, image in enumerate(images)]
            continue
        if suffix == ".npy":
            try:
                image = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot read the .npy file ({err})") from err
        elif suffix in IMAGE_SUFFIXES:
            image = read_image(path)
        else:
            raise DataError(f"{path}: unsupported input type {suffix!r}; give images, folders, .npy or .npz files")
        colour = image.ndim > spatial_dims and image.shape[-1] <= 4  # a last axis of <= 4 is channels
        if suffix == ".npy" and image.ndim == spatial_dims + 1 + colour:  # a stack: [N, *spatial(, C)]
            images = to_unit_range(image, str(path), bits, shallow)
            items += [(f"{path}[{i}]", one) for i, one in enumerate(images)]
            continue
        if image.ndim not in (spatial_dims, spatial_dims + 1) or (image.ndim > spatial_dims and not colour):
            axes = ", ".join("DHW"[3 - spatial_dims:])
            raise DataError(f"{path}: array of shape {list(image.shape)}; this {spatial_dims}D expert takes "
                            f"[{axes}] or [{axes}, C] with C <= 4 (.npy also stacks [N, {axes}(, C)])")
        items.append((str(path), to_unit_range(image, str(path), bits, shallow)))
    _warn_shallow(shallow)
    return items


def _npz_images(path: Path, split: str, bits: int | None, shallow: list[tuple[str, int]]) -> list[np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            key = f"{split}_images"
            if key not in arrays:
                raise DataError(f"{path}: has no key {key!r} (split {split!r}); keys {sorted(arrays.files)}")
            images = arrays[key]
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the .npz file ({err})") from err
    return list(to_unit_range(images, f"{path} key '{split}_images'", bits, shallow))  # one check and warning for the split


def preprocess(image: np.ndarray, card: dict[str, Any], name: str = "input",
               notes: dict[str, list[str]] | None = None) -> torch.Tensor:
    """Float ``[*spatial]`` / ``[*spatial, C]`` in [0, 1] -> ``[C, *size]`` as the expert was trained
    (card ``input_size`` None: the image's own size).

    Channels are replicated (gray -> colour) or averaged (colour -> gray) and the image is resized
    (bilinear/trilinear, antialiased in 2D) when it differs from the card; ``notes`` collects the
    names of such inputs under ``"channels"`` and ``"resized"``.

    Raises:
        DataError: a channel count that cannot be converted to the expert's.
    """
    spatial_dims = _spatial_dims(card)
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = x[None] if x.ndim == spatial_dims else x.movedim(-1, 0)
    channels = card["input_channels"]
    if x.shape[0] != channels:
        if x.shape[0] == 4 and channels in (1, 3):  # RGBA from a .npy: drop the alpha channel
            x = x[:3]
        if x.shape[0] == 1:
            x = x.expand(channels, *x.shape[1:])
        elif channels == 1:
            x = x.mean(0, keepdim=True)
        elif x.shape[0] != channels:
            raise DataError(f"{name}: image has {x.shape[0]} channels, the expert takes {channels}")
        if notes is not None:
            notes["channels"].append(name)
    size = card["input_size"] or x.shape[1:]
    size = (size,) * spatial_dims if isinstance(size, int) else tuple(size)
    if tuple(x.shape[1:]) != size:
        mode = "bilinear" if spatial_dims == 2 else "trilinear"
        x = F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=spatial_dims == 2)[0]
        if notes is not None:
            notes["resized"].append(name)
    norm = card["normalisation"]
    return (x - norm["mean"]) / norm["std"]


def _spatial_dims(card: dict[str, Any]) -> int:
    """The expert's spatial dims: the card's ``spatial_dims``, else the length of a list
    ``input_size``, else 2."""
    size = card.get("input_size")
    return int(card.get("spatial_dims") or (len(size) if isinstance(size, list) else 2))


def _warn(notes: dict[str, list[str]], card: dict[str, Any]) -> None:
    """One warning per kind of conversion, naming the first inputs concerned."""
    size = card["input_size"]
    size = "x".join(map(str, [size] * _spatial_dims(card) if isinstance(size, int) else size or []))
    what = {"channels": f"converted to {card['input_channels']} channel(s)", "resized": f"resized to {size}"}
    for kind, names in notes.items():
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            log.warning("predict: %d input(s) %s as the expert expects: %s", len(names), what[kind], shown)


@torch.no_grad()
def predict_files(expert_dir: Path, inputs: list[Path | str], split: str = "test", output: Path | None = None,
                  batch_size: int = 256, device: str = "cpu", bits: int | None = None,
                  class_indices: bool = False) -> list[dict[str, Any]]:
    """Probabilities of every input through the expert; printed as CSV or written to ``output``.

    ``inputs`` are files, folders or glob patterns (:func:`expand_inputs`). A row holds ``input``,
    ``prediction`` (class index), ``class_name`` when the card has ``class_names``, and ``p0..pK-1``.
    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"``. ``bits``: the bit depth of
    integer images wider than 8 bits (default: 16-bit, / 65535; see :func:`to_unit_range`).

    A segmentation expert (card ``task_kind: segmentation``) writes masks instead: see
    :func:`predict_masks` (``output`` is then the folder of the masks; ``class_indices``: masks of
    class indices instead of the training masks' values).

    Raises:
        DataError: a missing, unreadable or unsupported input (names it).
    """
    if read_card(expert_dir).get("task_kind") == "segmentation":
        return predict_masks(expert_dir, inputs, output, device=device, class_indices=class_indices)
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if bits is not None and not 9 <= bits <= 16:
        raise DataError(f"--bits must be in 9..16 (the depth of images wider than 8 bits), got {bits}")
    dev = _device(device)
    model = _load(expert_dir)
    card = _complete_card(model, expert_dir)
    model = model.to(dev)
    names = card.get("class_names")
    items = load_inputs(expand_inputs(inputs, CLASSIFICATION_SUFFIXES), split, _spatial_dims(card), bits)
    notes: dict[str, list[str]] = {"channels": [], "resized": []}
    rows = []
    step = batch_size if card["input_size"] else 1  # inputs of their own sizes go one at a time
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        x = torch.stack([preprocess(img, card, name, notes) for name, img in chunk]).to(dev)
        probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
        for (name, _), p in zip(chunk, probs):
            label = {"class_name": names[int(p.argmax())]} if names else {}
            rows.append({"input": name, "prediction": int(p.argmax()), **label,
                         **{f"p{c}": float(v) for c, v in enumerate(p)}})
    _warn(notes, card)
    write_rows(rows, output)
    return rows


def write_rows(rows: list[dict[str, Any]], output: Path | None) -> None:
    """Print ``rows`` as CSV, or write them to ``output`` (JSON when it ends in ``.json``, else CSV)."""
    text = _format(rows, "json" if output is not None and output.suffix == ".json" else "csv")
    if output is None:
        sys.stdout.write(text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)


def _load(folder: Path) -> torch.nn.Module:
    """The expert in ``folder``, in eval mode.

    Raises:
        DataError: its card has no ``architecture`` to build it from (names the card), or what
            :func:`lorkd.load_expert` raises.
    """
    if not read_card(folder).get("architecture"):
        raise DataError(f"{Path(folder) / EXPERT_CARD}: no 'architecture' to build the model from; save the expert "
                        "with lorkd.save_expert(model, folder, architecture={'factory': ..., 'kwargs': {...}})")
    return load_expert(folder).eval()


def _complete_card(model: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """The card of a classification expert with what ``predict`` needs: an expert saved with
    :func:`lorkd.save_expert` without a card lacks them, so ``input_channels`` and ``spatial_dims``
    are taken from the model's first convolution, ``input_size`` None (each input's own size) and
    ``normalisation`` mean 0, std 1 (inputs in [0, 1] as read); one warning names what was assumed.

    Raises:
        DataError: the card lacks ``input_channels`` and the model has no convolution (names the card).
    """
    card = dict(model.card)
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    missing = [k for k in ("input_channels", "input_size", "normalisation") if k not in card]
    if not missing:
        return card
    if conv is None and "input_channels" in missing:
        raise DataError(f"{Path(folder) / EXPERT_CARD}: no 'input_channels' and the model has no convolution to "
                        "take it from; add input_channels, input_size and normalisation to the card")
    if conv is not None and "spatial_dims" not in card and not isinstance(card.get("input_size"), list):
        card["spatial_dims"] = conv.weight.ndim - 2
    assumed = {"input_channels": conv.in_channels if conv is not None else None, "input_size": None,
               "normalisation": {"mean": 0.0, "std": 1.0}}
    card.update({k: assumed[k] for k in missing})
    log.warning("predict: %s has no %s (an expert saved without a card?): assuming %s; add them to the card "
                "(as `lorkd export` writes it) if the expert was trained otherwise", Path(folder) / EXPERT_CARD,
                ", ".join(missing), ", ".join(f"{k}={card[k]}" for k in missing))
    return card


def _device(name: str) -> torch.device:
    """``--device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.

    Raises:
        DataError: an unknown device name, or CUDA asked for where it is not available."""
    try:
        dev = resolve_device(name)
    except RuntimeError as err:
        raise DataError(f"--device {name!r}: not a device ({err})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name!r}: CUDA is not available here; use --device cpu")
    return dev


def _format(rows: list[dict[str, Any]], kind: str) -> str:
    if kind == "json":
        return json.dumps(rows, indent=1)
    buffer = io.StringIO()
    # the union of the rows' keys (rows of tasks with fewer classes leave the other cells empty)
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows for k in row)) or ["input"],
                            restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- segmentation

@torch.no_grad()
def segment(model: torch.nn.Module, image: np.ndarray, spacing: tuple[float, ...], card: dict[str, Any],
            device: torch.device | str = "cpu", name: str = "input") -> np.ndarray:
    """Mask ``[*spatial]`` (uint8 class indices, the input's own grid) of ``image`` ``[C, *spatial]``:
    channels fitted as in training (:func:`_task_channels`, then the card's ``channel_fill`` up to
    ``in_channels``), preprocessing of the card, sliding-window logits, resampled back to the
    input's shape, argmax.

    Raises:
        DataError: the input's dimensions or channels do not fit the expert (names ``name``).
    """
    spatial = image.ndim - 1
    if spatial not in (card["spatial_dims"], card["spatial_dims"] + 1):
        raise DataError(f"{name}: input of shape {image.shape} ([C, *spatial]) does not fit this "
                        f"{card['spatial_dims']}D expert")
    image = _task_channels(image, card, name)
    pre = card["preprocessing"]
    tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    prep = Preprocess(pre["normalize"], tup(pre["scale"]), tup(pre["target_spacing"]), tup(pre["target_shape"]))
    shape = image.shape[1:]
    case = Case("input", "input", image, np.zeros(shape, np.int64), tuple(spacing), None, "")
    case, _ = preprocess_case(case, prep)
    x = torch.from_numpy(fit_channels(case.image, card["in_channels"], card.get("channel_fill", "zeros")).copy())
    inf = card["inference"]
    logits = sliding_window_logits(model, x, inf["roi_size"], inf["overlap"], inf["sw_batch_size"], inf["mode"], device)
    if tuple(logits.shape[1:]) != tuple(shape):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial]
        logits = F.interpolate(logits[None], size=tuple(shape), mode=mode, align_corners=False)[0]
    return logits.argmax(0).numpy().astype(np.uint8)


def _task_channels(image: np.ndarray, card: dict[str, Any], name: str) -> np.ndarray:
    """``image`` ``[C, *spatial]`` with the channels of the expert's own task (card
    ``task_channels``, else ``in_channels``): one channel is repeated, several are averaged to one
    (both warned, naming ``name``); the network's extra channels (``in_channels``) are filled later
    as in training.

    Raises:
        DataError: any other channel mismatch (names ``name`` and both counts).
    """
    want = int(card.get("task_channels") or card["in_channels"])
    have = image.shape[0]
    if have == want:
        return image
    if have == 1:
        log.warning("predict: %s: 1 channel repeated to the %d channels the expert was trained on", name, want)
        return np.repeat(image, want, axis=0)
    if want == 1:
        log.warning("predict: %s: %d channels averaged to the 1 channel the expert was trained on", name, have)
        return image.mean(0, keepdims=True)
    raise DataError(f"{name}: image has {have} channels, the expert was trained on {want}")


def to_orientation(image: np.ndarray, affine: np.ndarray, codes: str, name: str = "input") -> tuple[np.ndarray, tuple[float, ...], np.ndarray, str]:
    """Flip / transpose a NIfTI volume ``[C, X, Y, Z]`` to the axis codes the expert was trained in
    (card ``orientation``, e.g. ``"SPL"``) with :func:`lorkd.data.segmentation.reorient`; exact.

    Returns:
        ``(image [C, *spatial'], spacing', affine', from_codes)``: reorienting a mask ``[*spatial']``
        with ``affine'`` to ``from_codes`` puts it back on the file's own axes.

    Raises:
        DataError: the affine or the codes cannot be used (names the file).
    """
    try:
        moved, new_affine, from_codes = reorient(image, affine, to=codes, channels_first=True)
    except DataError as err:
        raise DataError(f"{name}: {err}") from err
    spacing = tuple(float(v) for v in np.linalg.norm(new_affine[:3, :3], axis=0))
    if from_codes != codes:
        log.info("predict: %s: reoriented %s -> %s as the expert was trained; the mask is written back in %s",
                 name, from_codes, codes, from_codes)
    return np.ascontiguousarray(moved), spacing, new_affine, from_codes


def _mask_stem(source: Path) -> str:
    """The name of ``source`` without its input suffix (a DICOM folder: its name): its mask is
    ``<stem>_mask.<ext>``."""
    suffix = input_suffix(source)
    return source.name[: -len(suffix)] if suffix and source.name.lower().endswith(suffix) else source.stem


def label_lookup(card: dict[str, Any], folder: Path, class_indices: bool = False) -> np.ndarray | None:
    """Class index -> the value masks are written with: the card's ``label_values`` (``[k]``: the
    value class ``k`` had in the task's mask files) as an array of the smallest fitting dtype
    (uint8, uint16, int32); ``None`` (masks hold class indices) with ``class_indices``, or when the
    card has no ``label_values`` (an expert exported before lorkd recorded them: noted in the log)
    or ``label_values: null``.

    Raises:
        DataError: ``label_values`` is not ``classes`` distinct integers (names the card and key).
    """
    values = card.get("label_values")
    if class_indices or values is None:
        if not class_indices and "label_values" not in card:
            log.warning("predict: %s has no label_values (exported before lorkd recorded them): masks hold class "
                        "indices 0..%d, not the values of the training masks", folder / EXPERT_CARD,
                        card["classes"] - 1)
        return None
    ok = (isinstance(values, list) and len(values) == card["classes"] and len(set(values)) == len(values)
          and all(isinstance(v, int) and not isinstance(v, bool) for v in values))
    if not ok:
        raise DataError(f"{folder / EXPERT_CARD}: label_values must list {card['classes']} distinct integers (the mask "
                        f"value of each class), got {values!r}")
    lo, hi = min(values), max(values)
    dtype = np.uint8 if 0 <= lo and hi <= 255 else np.uint16 if 0 <= lo and hi <= 65535 else np.int32
    return np.asarray(values, dtype=dtype)


def write_mask(mask: np.ndarray, source: InputImage, folder: Path) -> Path:
    """Write ``mask`` (uint8, uint16 or int32) beside the name of ``source`` in ``folder``: for a
    volume NIfTI in the input's geometry (a NIfTI input: its affine and header, the mask's dtype;
    NRRD or a DICOM series: their affine; HDF5: the identity), for a 2D image a PNG (8- or 16-bit).

    Raises:
        DataError: a 2D mask with values a PNG cannot hold (negative or above 65535; names the file).
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem = _mask_stem(source.path)
    if mask.ndim == 2 and source.affine is None:
        path = folder / f"{stem}_mask.png"
        if mask.dtype not in (np.uint8, np.uint16):
            raise DataError(f"{path}: mask values {int(mask.min())}..{int(mask.max())} do not fit a PNG (0..65535); "
                            "predict with --class-indices")
        Image.fromarray(mask).save(path)
        return path
    if source.kind == "nifti":
        header = nib.load(str(source.path)).header.copy()
        header.set_data_dtype(mask.dtype)
        out = nib.Nifti1Image(mask, source.affine, header)
    else:
        out = nib.Nifti1Image(mask, source.affine if source.affine is not None else np.eye(4))
    path = folder / f"{stem}_mask.nii.gz"
    nib.save(out, str(path))
    return path


def predict_masks(expert_dir: Path, inputs: list[Path | str], output: Path | None = None,
                  device: str = "cpu", class_indices: bool = False) -> list[dict[str, Any]]:
    """Masks of every input (files, folders, glob patterns) through a segmentation expert, written
    to ``output`` (a folder, default ``./masks``); a CSV line per input (mask path, shape, voxels
    per class index) is printed. When the card names an ``orientation`` (the axis codes the training
    volumes were turned to), a NIfTI input is turned to it first and its mask turned back.

    Mask values are those of the task's training masks (card ``label_values``: a task of 0/255
    masks gives 0/255 masks), or class indices ``0..K-1`` with ``class_indices`` or a card
    without ``label_values`` (see :func:`label_lookup`).

    Raises:
        DataError: a missing or unreadable input, one that does not fit the expert, or two inputs
            whose masks would have the same name (names both).
    """
    dev = _device(device)
    model = _load(expert_dir)
    card = model.card
    missing = [k for k in ("classes", "in_channels", "spatial_dims", "preprocessing", "inference") if k not in card]
    if missing:
        raise DataError(f"{Path(expert_dir) / EXPERT_CARD}: a segmentation card needs {', '.join(missing)} (as "
                        "`lorkd export` writes them)")
    lookup = label_lookup(card, Path(expert_dir), class_indices)
    model = model.to(dev)
    folder = Path(output) if output is not None else Path("masks")
    rows = [mask_file(model, card, path, dev, lookup, folder) for path in mask_inputs(inputs, folder)]
    sys.stdout.write(_format(rows, "csv"))
    return rows


def mask_inputs(inputs: list[Path | str], folder: Path) -> list[Path]:
    """The volume and image files of ``inputs`` (files, folders, glob patterns).

    Raises:
        DataError: two inputs whose masks would have the same name in ``folder`` (names both).
    """
    paths = expand_inputs(inputs, INPUT_SUFFIXES, series=True)
    seen: dict[str, Path] = {}
    for path in paths:
        other = seen.setdefault(_mask_stem(path).lower(), path)
        if other != path:
            raise DataError(f"{other} and {path} would both write the mask {_mask_stem(path)}_mask in {folder}; "
                            "predict them into separate --output folders")
    return paths


def mask_file(model: torch.nn.Module, card: dict[str, Any], path: Path, dev: torch.device,
              lookup: np.ndarray | None, folder: Path, read: Any = None) -> dict[str, Any]:
    """Segment one file with an expert and its card (a NIfTI turned to the card's ``orientation``
    first and its mask back), write the mask into ``folder`` (values through ``lookup``) and return
    its CSV row (input, mask, shape, voxels per class index). ``read``: the file's
    :func:`read_input_image`, when the caller has read it already."""
    item = read or read_input_image(path)
    image, spacing, back = item.image, item.spacing, None
    if card.get("orientation") and item.affine is not None and image.ndim == 4:
        image, spacing, affine, back = to_orientation(image, item.affine, card["orientation"], str(path))
    mask = segment(model, image, spacing, card, dev, str(path))
    if back is not None:
        mask = np.ascontiguousarray(reorient(mask, affine, to=back)[0])
    written = write_mask(mask if lookup is None else lookup[mask], item, folder)
    counts = np.bincount(mask.reshape(-1), minlength=card["classes"])
    return {"input": str(path), "mask": str(written), "shape": "x".join(map(str, mask.shape)),
            **{f"voxels_{c}": int(n) for c, n in enumerate(counts)}}
