"""2D and 3D classification tasks in the MedMNIST ``.npz`` layout.

A MedMNIST file holds six arrays: ``{train,val,test}_images`` and ``{train,val,test}_labels``
(uint8 ``[N, 1]`` or ``[N]``). Images are 2D (``[N, H, W]`` grayscale, ``[N, H, W, C]`` colour) or
3D volumes (``[N, D, H, W]``, as the MedMNIST 3D sets, or ``[N, D, H, W, C]``).
:func:`load_npz_task` reads and checks such a file and returns a :class:`ClassificationTask`, the
in-memory form every other part of ``lorkd`` (datasets, samplers, pipelines) works with.

A 4D array is read as 2D colour images when its last axis is a small channel count (1, 3 or
4) and the two before it are larger, and as volumes when its three axes are equal (the MedMNIST
3D cubes, ``28^3`` or ``64^3``); any other 4D shape (``[N, 8, 28, 28]``: eight channels, or a
volume of depth 8?) is refused unless ``spatial_dims`` says which it is.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lorkd.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class ClassificationTask:
    """One single-label classification task with its splits held in memory.

    Attributes:
        name: task name, e.g. ``"breastmnist"``.
        images: split -> uint8 (0-255) or float32 (in [0, 1]) array ``[N, *spatial]`` (one channel)
            or ``[N, *spatial, C]``, with ``spatial`` ``(H, W)`` in 2D and ``(D, H, W)`` in 3D; see
            :func:`image_unit_scale`.
        labels: split -> int64 array ``[N]`` with values in ``[0, num_classes)``.
        num_classes: number of classes.
        channels: 1 for ``[N, *spatial]`` images, else ``C``.
        source: the file the task was read from, or ``"synthetic"``.
        spatial_dims: 2 for images, 3 for volumes.
    """

    name: str
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    num_classes: int
    channels: int
    source: str
    spatial_dims: int = 2

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names, e.g. ``("train", "val", "test")``."""
        return tuple(self.images)

    def num_samples(self, split: str) -> int:
        """Number of samples in ``split``; raises ``DataError`` if the task has no such split."""
        if split not in self.images:
            raise DataError(f"task {self.name!r} ({self.source}) has no split {split!r}; it has {list(self.images)}")
        return int(self.labels[split].shape[0])

    @property
    def image_size(self) -> tuple[int, ...]:
        """``(H, W)`` of the images, ``(D, H, W)`` of volumes (the same for every split)."""
        first = next(iter(self.images.values()))
        return tuple(int(n) for n in first.shape[1:1 + self.spatial_dims])

    def class_counts(self, split: str) -> np.ndarray:
        """int64 ``[num_classes]``: how many samples of each class ``split`` holds."""
        self.num_samples(split)
        return np.bincount(self.labels[split], minlength=self.num_classes).astype(np.int64)


def _as_images(arr: np.ndarray, where: str) -> np.ndarray:
    """Check ``arr`` is 3D to 5D (``[N, H, W]`` .. ``[N, D, H, W, C]``) and bring it to one of the
    two stored forms by its dtype: uint8 (0-255, kept) or float32 in [0, 1].

    * uint8: kept; read as ``x / 255`` by the datasets.
    * uint16: float32 ``x / 65535`` (16-bit images keep their precision).
    * bool: float32 0 / 1.
    * other integers: must lie in [0, 255] (then uint8), else refused.
    * floats: must be finite; all values in [0, 1]: kept (float32); max in (1, 255]: read as a 0-255
      scale (integral values: uint8, else float32 ``x / 255``); anything else is refused.
    """
    if arr.ndim not in (3, 4, 5):
        raise DataError(f"{where}: images must be 3D [N, H, W], 4D [N, H, W, C] or [N, D, H, W] (volumes), "
                        f"or 5D [N, D, H, W, C], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr.astype(np.float32) / 65535.0).astype(np.float32)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    accepted = "store images as uint8 (0-255), uint16 (0-65535) or float in [0, 1]"
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: images of dtype {arr.dtype} cannot be read; {accepted}")
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise DataError(f"{where}: images of dtype {arr.dtype} hold non-finite values; {accepted}")
    lo, hi = arr.min(), arr.max()
    if np.issubdtype(arr.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images of dtype {arr.dtype} hold values in [{lo}, {hi}], outside "
                            f"[0, 255] (not uint8-convertible); {accepted}")
        return arr.astype(np.uint8)
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: float images hold values in [{lo:.4g}, {hi:.4g}], neither in [0, 1] nor in "
                        f"[0, 255] (not uint8-convertible); {accepted}")
    if hi <= 1.0:
        return arr.astype(np.float32)
    if np.all(arr == np.round(arr)):
        return arr.astype(np.uint8)
    return (arr / 255.0).astype(np.float32)


def image_unit_scale(images: np.ndarray) -> float:
    """The factor that brings stored ``images`` to [0, 1]: ``1 / 255`` for uint8, 1 for float32."""
    return 1.0 / 255.0 if images.dtype == np.uint8 else 1.0


COLOUR_CHANNELS = (1, 3, 4)


def infer_spatial_dims(shape: tuple[int, ...], where: str, spatial_dims: int | None = None) -> int:
    """2 (images) or 3 (volumes) for an image array of ``shape`` ``[N, ...]`` (see the module docstring).

    Args:
        shape: the array's shape, 3D to 5D.
        where: names the file and key in errors.
        spatial_dims: the caller's answer (2 or 3), checked against the shape; ``None``: infer.

    Raises:
        DataError: ``spatial_dims`` does not fit the shape, or the shape is ambiguous and
            ``spatial_dims`` is not given (the message suggests setting it).
    """
    ndim = len(shape)
    if spatial_dims is not None:
        if spatial_dims not in (2, 3):
            raise DataError(f"{where}: spatial_dims must be 2 or 3, got {spatial_dims}")
        fits = {2: (3, 4), 3: (4, 5)}[spatial_dims]
        if ndim not in fits:
            layouts = "[N, H, W] or [N, H, W, C]" if spatial_dims == 2 else "[N, D, H, W] or [N, D, H, W, C]"
            raise DataError(f"{where}: spatial_dims={spatial_dims} needs images {layouts}, got shape {tuple(shape)}")
        return spatial_dims
    if ndim in (3, 5):
        return 2 if ndim == 3 else 3
    a, b, c = shape[1:]
    if c in COLOUR_CHANNELS and min(a, b) > c:
        return 2
    if a == b == c:
        return 3
    raise DataError(f"{where}: images of shape {tuple(shape)} are ambiguous: 2D images [N, H, W, C] with C={c} "
                    f"channels, or 3D volumes [N, D, H, W] of depth {a}? Set spatial_dims (2 or 3) for this task "
                    "in data.tasks")


def _as_int64_labels(arr: np.ndarray, where: str) -> np.ndarray:
    """Check ``arr`` is ``[N]`` or ``[N, 1]`` integral and non-negative; return it as int64 ``[N]``."""
    if arr.ndim == 2 and arr.shape[1] > 1:
        raise DataError(f"{where}: labels have shape {arr.shape}, i.e. {arr.shape[1]} columns (multi-label); "
                        "multi-label tasks are not supported")
    if arr.ndim not in (1, 2):
        raise DataError(f"{where}: labels must be [N] or [N, 1], got shape {arr.shape}")
    arr = arr.reshape(-1)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool):
        raise DataError(f"{where}: labels of dtype {arr.dtype} are not integers")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        raise DataError(f"{where}: labels of dtype {arr.dtype} hold non-integer values")
    if arr.size and arr.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {arr.min()}")
    return arr.astype(np.int64)


def _check_label_sets(path: str | Path, labels: dict[str, np.ndarray], num_classes: int, inferred: bool) -> None:
    """Every class of val and test must occur in train; with ``num_classes`` inferred from the
    largest label, every class ``0 .. num_classes - 1`` must occur in some split (a gap means
    shifted or re-coded labels, which would silently train extra classes)."""
    train = set(np.unique(labels["train"]).tolist())
    for split in SPLITS[1:]:
        extra = sorted(set(np.unique(labels[split]).tolist()) - train)
        if extra:
            raise DataError(f"{path}: key '{split}_labels' holds classes {extra} that never occur in key "
                            f"'train_labels' (which holds {sorted(train)}); are the labels of one split shifted?")
    if inferred:
        seen = set().union(*(np.unique(labels[s]).tolist() for s in SPLITS))
        missing = sorted(set(range(num_classes)) - seen)
        if missing:
            raise DataError(f"{path}: classes {missing} occur in no split although the largest label is "
                            f"{num_classes - 1} (key 'train_labels' holds {sorted(train)}); relabel to 0..K-1, or "
                            "give num_classes for this task in the config if the classes exist but are unseen")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of ``path``; any read failure becomes a ``DataError`` naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive (a single .npy array?)")
        with npz:
            return {key: npz[key] for key in npz.files}
    except DataError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a valid .npz file (corrupt or truncated?): {exc}") from exc


def load_npz_task(path: str | Path, name: str | None = None, num_classes: int | None = None,
                  spatial_dims: int | None = None) -> ClassificationTask:
    """Read a MedMNIST-layout ``.npz`` file into a :class:`ClassificationTask`.

    Args:
        path: the ``.npz`` file with keys ``{train,val,test}_images`` and ``{train,val,test}_labels``.
        name: task name; defaults to the file name without extension.
        num_classes: number of classes; defaults to ``max label + 1`` over all splits.
        spatial_dims: 2 (images) or 3 (volumes); ``None``: inferred from the shape (see
            :func:`infer_spatial_dims`).

    Returns:
        The task with images ``[N, *spatial(, C)]`` (uint8, or float32 in [0, 1]: see
        :func:`_as_images` for how each dtype is read) and int64 labels ``[N]`` per split.

    Raises:
        DataError: the file is missing, not a valid npz (corrupt, truncated), lacks a key; images are
            not 3D-5D, ambiguous (2D colour or 3D?) without ``spatial_dims``, of a dtype or range
            that cannot be read, or differ in shape between splits; a split is empty or its images
            and labels differ in length; labels are negative, multi-label (more than one column),
            or ``>= num_classes``; val or test hold a class train lacks; with ``num_classes``
            inferred, a class below the largest label occurs in no split. The message names the
            file and the key.
    """
    path = Path(path)
    return task_from_arrays(_read_npz(path), name if name is not None else path.stem, str(path), num_classes,
                            spatial_dims)


def task_from_arrays(arrays: dict[str, np.ndarray], name: str, source: str, num_classes: int | None = None,
                     spatial_dims: int | None = None, where: str | None = None) -> ClassificationTask:
    """A :class:`ClassificationTask` from arrays in the ``.npz`` layout (``{split}_images``,
    ``{split}_labels``), checked as :func:`load_npz_task` says; ``where`` (default ``source``) starts
    every error message (a file path, or ``tasks[i] ('name')`` for arrays given in memory)."""
    path = where or source
    missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in arrays]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; found {sorted(arrays)}")

    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for split in SPLITS:
        imgs = _as_images(arrays[f"{split}_images"], f"{path} key '{split}_images'")
        labs = _as_int64_labels(arrays[f"{split}_labels"], f"{path} key '{split}_labels'")
        if imgs.shape[0] == 0:
            raise DataError(f"{path}: split {split!r} is empty (key '{split}_images' has 0 images)")
        if imgs.shape[0] != labs.shape[0]:
            raise DataError(f"{path}: '{split}_images' holds {imgs.shape[0]} images but "
                            f"'{split}_labels' holds {labs.shape[0]} labels")
        images[split], labels[split] = imgs, labs

    shapes = {split: images[split].shape[1:] for split in SPLITS}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{path}: image shapes [H, W(, C)] differ between splits (keys "
                        f"{', '.join(repr(f'{s}_images') for s in SPLITS)}): {shapes}")
    dims = infer_spatial_dims(images["train"].shape, f"{path} key 'train_images'", spatial_dims)
    channels = 1 if images["train"].ndim == dims + 1 else int(images["train"].shape[-1])

    max_label = max(int(labels[s].max()) for s in SPLITS)
    inferred = num_classes is None
    if num_classes is None:
        num_classes = max_label + 1
    elif num_classes < 1:
        raise DataError(f"{path}: num_classes must be >= 1, got {num_classes}")
    for split in SPLITS:
        if int(labels[split].max()) >= num_classes:
            raise DataError(f"{path}: split {split!r} key '{split}_labels' holds label {int(labels[split].max())} "
                            f">= num_classes={num_classes}")
    _check_label_sets(path, labels, num_classes, inferred)

    return ClassificationTask(
        name=name,
        images=images,
        labels=labels,
        num_classes=int(num_classes),
        channels=channels,
        source=source,
        spatial_dims=dims,
    )


def stratified_random(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified random subset of at most ``n`` of ``labels`` ``[N]``
    (each class keeps its share, at least one; drawn with ``seed``); all of them when ``n >= N``."""
    total = len(labels)
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[:max(1, int(round(n * len(idx) / total)))])
    keep = np.concatenate(keep)
    if len(keep) > n:  # rounding up the classes' shares overshot by at most one per class
        keep = rng.choice(keep, n, replace=False)
    return np.sort(keep)


def keep_train(task: ClassificationTask, keep: np.ndarray) -> ClassificationTask:
    """``task`` with only the training images at indices ``keep``; val and test are untouched."""
    images, labels = dict(task.images), dict(task.labels)
    images["train"], labels["train"] = task.images["train"][keep], task.labels["train"][keep]
    return replace(task, images=images, labels=labels)


def cap_train(task: ClassificationTask, max_train: int | None, seed: int = 0) -> ClassificationTask:
    """``task`` with at most ``max_train`` training images: a class-stratified random subset drawn
    with ``seed`` (:func:`stratified_random`); val and test are untouched."""
    if max_train is None or max_train >= task.num_samples("train"):
        return task
    return keep_train(task, stratified_random(task.labels["train"], max_train, seed))
