"""The embedded synthetic data set: small multi-modality classification tasks generated in code.

It stands in for MedMNIST when no real data is at hand (demos, tests, CI). Each task mimics one
imaging modality and has its own label rule, so that a multi-task student meets heterogeneous data:

=================  =====  =======  ==========================================================
task               chans  classes  label rule
=================  =====  =======  ==========================================================
synth_ultrasound   1      2        dark lesion in speckle: oval with posterior enhancement (0)
                                   or lobulated with posterior shadowing (1)
synth_xray         1      3        lungs: clear (0), small focal nodule (1), large diffuse haze (2)
synth_dermoscopy   3      4        lesion on skin: 2 x colour (brown / blue-grey) x pattern
                                   (uniform / dotted), label = 2 * colour + pattern
synth_pathology    3      3        H&E-like tissue: nuclei density sparse (0) / medium (1) / dense (2)
=================  =====  =======  ==========================================================

Every rule is invariant to flips and small affine changes, so augmentation keeps labels valid.
The ultrasound speckle is mild (sd 0.1): with sd 1/3 (the first version), the bilinear resampling of
training augmentation removed two thirds of its pixel-to-pixel variance, so augmented training
images and untouched validation images differed in texture, and the ultrasound classifiers'
validation accuracy fell to chance at some epochs while their AUC stayed high (a shifted threshold).
Position, size, contrast and noise vary at random, so the tasks are learnable by a small CNN but
not by a pixel threshold. Generation is vectorised numpy and deterministic for a seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lorkd.data.medmnist import SPLITS, ClassificationTask
from lorkd.errors import DataError

Generator = Callable[[np.random.Generator, np.ndarray, int], np.ndarray]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in ``[-1, 1]``, each ``[1, size, size]`` (y, x)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return c[None, :, None] * np.ones((1, 1, size), np.float32), c[None, None, :] * np.ones((1, size, 1), np.float32)


def _u(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """``n`` uniform draws in ``[lo, hi)`` shaped ``[n, 1, 1]`` (float32) for broadcasting over pixels."""
    return rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _ultrasound(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Grayscale ``[N, size, size]``: speckled tissue with a hypoechoic lesion, oval or lobulated."""
    n = len(labels)
    yy, xx = _grid(size)
    cy, cx = _u(rng, -0.3, 0.3, n), _u(rng, -0.3, 0.3, n)
    r0 = _u(rng, 0.38, 0.55, n)
    aspect = _u(rng, 0.7, 1.0, n)
    rot = _u(rng, 0, np.pi, n)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    lobed = (labels == 1)[:, None, None]
    amp = np.where(lobed, _u(rng, 0.22, 0.35, n), _u(rng, 0.0, 0.04, n))
    freq = rng.integers(3, 6, n).astype(np.float32)[:, None, None]
    radius = r0 * (1 + amp * np.sin(freq * theta + _u(rng, 0, 2 * np.pi, n)))
    inside = 1 / (1 + np.exp(-(radius - rho) / 0.03))
    tissue = _u(rng, 0.45, 0.7, n) * (1.0 - 0.35 * (yy + 1) / 2)  # attenuation with depth
    # posterior acoustic features below the lesion: enhancement if oval, shadowing if lobulated
    below = 1 / (1 + np.exp(-(yy - cy - r0) / 0.05)) * np.exp(-(((xx - cx) / r0) ** 4))
    posterior = np.where(lobed, _u(rng, -0.3, 0.05, n), _u(rng, -0.05, 0.3, n))
    echo = tissue * (1 - inside * _u(rng, 0.6, 0.85, n)) * (1 + posterior * below)
    # pixel-independent speckle: mean 1, sd 0.1 (gamma of shape 100); see the module doc for why not 1/3
    speckle = rng.gamma(100.0, 1 / 100.0, size=(n, size, size)).astype(np.float32)
    return _to_uint8(echo * speckle)


def _xray(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Grayscale ``[N, size, size]``: chest-like gradients, dark lungs, a nodule or a diffuse haze."""
    n = len(labels)
    yy, xx = _grid(size)
    body = 0.55 + 0.25 * (1 - xx**2) + _u(rng, -0.1, 0.1, n) * yy
    lungs = np.zeros_like(body)
    for side in (-1.0, 1.0):
        ly, lx = _u(rng, -0.1, 0.05, n), side * _u(rng, 0.35, 0.45, n)
        d = ((xx - lx) / _u(rng, 0.22, 0.28, n)) ** 2 + ((yy - ly) / _u(rng, 0.5, 0.6, n)) ** 2
        lungs = lungs + np.exp(-(d**2))
    img = body - _u(rng, 0.35, 0.5, n) * lungs
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
    oy, ox = _u(rng, -0.35, 0.25, n), side * _u(rng, 0.25, 0.5, n)
    small = labels == 1
    sigma = np.where(small[:, None, None], _u(rng, 0.06, 0.1, n), _u(rng, 0.22, 0.32, n))
    amp = np.where(small[:, None, None], _u(rng, 0.35, 0.5, n), _u(rng, 0.25, 0.35, n))
    amp = np.where((labels == 0)[:, None, None], 0.0, amp)
    img = img + amp * np.exp(-((yy - oy) ** 2 + (xx - ox) ** 2) / (2 * sigma**2))
    img = (img - 0.5) * _u(rng, 0.8, 1.2, n) + 0.5 + rng.normal(0, 0.03, (n, size, size)).astype(np.float32)
    return _to_uint8(img)


def _dermoscopy(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """RGB ``[N, size, size, 3]``: skin with a lesion; colour and dot pattern set the label."""
    n = len(labels)
    yy, xx = _grid(size)
    skin = np.stack([_u(rng, 0.75, 0.95, n), _u(rng, 0.55, 0.72, n), _u(rng, 0.45, 0.62, n)], -1)  # [N,1,1,3]
    shade = (1 + 0.08 * (_u(rng, -1, 1, n) * xx + _u(rng, -1, 1, n) * yy))[..., None]
    cy, cx = _u(rng, -0.25, 0.25, n), _u(rng, -0.25, 0.25, n)
    rho = np.hypot((yy - cy) / _u(rng, 0.35, 0.6, n), (xx - cx) / _u(rng, 0.35, 0.6, n))
    mask = (1 / (1 + np.exp((rho - 1) / 0.08)))[..., None]
    blue = (labels // 2 == 1)[:, None, None, None]
    brown = np.stack([_u(rng, 0.35, 0.5, n), _u(rng, 0.2, 0.3, n), _u(rng, 0.1, 0.18, n)], -1)
    grey = np.stack([_u(rng, 0.3, 0.42, n), _u(rng, 0.33, 0.45, n), _u(rng, 0.45, 0.6, n)], -1)
    lesion = np.where(blue, grey, brown)
    period = _u(rng, 0.22, 0.3, n)
    dots = (np.cos(np.pi * (yy - cy) / period * 2) * np.cos(np.pi * (xx - cx) / period * 2) > 0.4)
    dotted = (labels % 2 == 1)[:, None, None]
    lesion = lesion * (1 - 0.45 * (dotted & dots)[..., None])
    img = (skin * (1 - mask) + lesion * mask) * shade
    return _to_uint8(img + rng.normal(0, 0.025, img.shape).astype(np.float32))


def _pathology(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """RGB ``[N, size, size, 3]``: pink stroma with purple nuclei; nuclei density sets the label."""
    n = len(labels)
    yy, xx = _grid(size)
    lo = np.array([3, 9, 17])[labels]
    hi = np.array([6, 13, 24])[labels]
    counts = rng.integers(lo, hi + 1)
    stain = np.zeros((n, size, size), np.float32)
    for k in range(int(hi.max())):
        on = (k < counts).astype(np.float32)[:, None, None]
        ny, nx = _u(rng, -0.95, 0.95, n), _u(rng, -0.95, 0.95, n)
        s = _u(rng, 0.05, 0.09, n)
        stain = np.maximum(stain, on * np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / (2 * s**2)))
    eosin = np.stack([_u(rng, 0.85, 0.97, n), _u(rng, 0.55, 0.75, n), _u(rng, 0.75, 0.9, n)], -1)
    hema = np.stack([_u(rng, 0.3, 0.45, n), _u(rng, 0.15, 0.3, n), _u(rng, 0.5, 0.65, n)], -1)
    a = stain[..., None]
    img = eosin * (1 - a) + hema * a
    return _to_uint8(img + rng.normal(0, 0.04, img.shape).astype(np.float32))


#: (name, channels, num_classes, generator), in the order ``make_synthetic_tasks`` uses them.
MODALITIES: tuple[tuple[str, int, int, Generator], ...] = (
    ("synth_ultrasound", 1, 2, _ultrasound),
    ("synth_xray", 1, 3, _xray),
    ("synth_dermoscopy", 3, 4, _dermoscopy),
    ("synth_pathology", 3, 3, _pathology),
)


def make_synthetic_tasks(
    num_tasks: int = 3,
    size: int = 28,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 300,
    seed: int = 0,
) -> list[ClassificationTask]:
    """Generate ``num_tasks`` synthetic classification tasks (the embedded default data set).

    Task ``t`` uses modality ``MODALITIES[t % 4]`` (ultrasound 2 classes, X-ray 3, dermoscopy RGB 4,
    pathology RGB 3); past the fourth, names get a suffix (``synth_xray_2``) and fresh random draws.
    Classes are balanced within each split (counts differ by at most one), in random order.

    Args:
        num_tasks: how many tasks, >= 1.
        size: image side in pixels, >= 8.
        n_train, n_val, n_test: samples per split and task, each >= 1.
        seed: integer >= 0; the same seed gives identical arrays.

    Returns:
        Tasks with uint8 images ``[N, size, size]`` (grayscale) or ``[N, size, size, 3]`` (RGB),
        int64 labels ``[N]`` and ``source == "synthetic"``.

    Raises:
        DataError: a count or size out of range (message names the argument).
    """
    for arg, value, low in (("num_tasks", num_tasks, 1), ("size", size, 8), ("n_train", n_train, 1),
                            ("n_val", n_val, 1), ("n_test", n_test, 1), ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise DataError(f"make_synthetic_tasks: {arg} must be an integer >= {low}, got {value!r}")
    counts = dict(zip(SPLITS, (n_train, n_val, n_test)))
    tasks = []
    for t in range(num_tasks):
        name, channels, num_classes, generate = MODALITIES[t % len(MODALITIES)]
        if t >= len(MODALITIES):
            name = f"{name}_{t // len(MODALITIES) + 1}"
        images, labels = {}, {}
        for s, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, t, s])
            labs = rng.permutation(np.arange(counts[split]) % num_classes).astype(np.int64)
            images[split], labels[split] = generate(rng, labs, size), labs
        tasks.append(ClassificationTask(name, images, labels, num_classes, channels, "synthetic"))
    return tasks
