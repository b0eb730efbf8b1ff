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

The **hard family** (``family="hard"``, config ``data.synthetic.family: hard``) keeps the names, the
channels and the looks, but its classes differ in small, local cues at a random place, against
nuisance variation in position, size, shape, contrast and colour and against distractors (the basic
family's cues drawn independently of the label, ribs, hairs), so that a network needs far more than
80 images per task to learn them (issue 30: a teacher with 1500 images must have something to pass on):

=================  =====  =======  ==========================================================
task               chans  classes  label rule
=================  =====  =======  ==========================================================
synth_ultrasound   1      4        2 x margin (smooth / microlobulated) + internal echoes
                                   (none / a few faint echogenic foci); posterior distractor
synth_xray         1      4        faint pattern in one zone of one lung: none (0), reticular
                                   grid (1), miliary nodules (2), ground-glass haze (3); ribs
synth_dermoscopy   3      4        structure: homogeneous (0), globules (1), pigment network
                                   (2), peripheral radial streaks (3); colour, hairs: nuisance
synth_pathology    3      3        nuclei shape at a random density: round (0), elongated and
                                   aligned (1), large and pleomorphic (2)
=================  =====  =======  ==========================================================

Measured with a small plain-torch CNN (5 conv layers, 16-64 channels, AdamW 2e-3, flips and 2-pixel
shifts, 600 steps of 32; one thread; validation accuracy on 600 images per task), 1500 vs 80
class-stratified training images per task, seed 0 / seed 1: ultrasound 0.93 vs 0.74 / 0.90 vs 0.67,
X-ray 0.74 vs 0.58 (0.89 with 1500 steps) / 0.82 vs 0.60, dermoscopy 0.94 vs 0.50 / 0.94 vs 0.48,
pathology 0.94 vs 0.78 / 0.95 vs 0.77; chance 0.25 (pathology 0.33).
The same probe on the basic family with 80 images: ultrasound 0.98, X-ray 0.99, dermoscopy 1.00.
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


def _lungs(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, n: int, y: tuple[float, float],
           x: tuple[float, float], width: tuple[float, float], height: tuple[float, float]) -> np.ndarray:
    """Two soft elliptic lung fields ``[N, size, size]`` (about 1 inside), left then right: centre
    height in ``y``, distance from the midline in ``x``, half-axes in ``width`` and ``height``."""
    lungs = np.zeros((n, yy.shape[1], xx.shape[2]), np.float32)
    for side in (-1.0, 1.0):
        ly, lx = _u(rng, *y, n), side * _u(rng, *x, n)
        d = ((xx - lx) / _u(rng, *width, n)) ** 2 + ((yy - ly) / _u(rng, *height, n)) ** 2
        lungs = lungs + np.exp(-(d**2))
    return lungs


def _xray(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """Grayscale ``[N, size, size]``: chest-like gradients, dark lungs, a nodule or a diffuse haze."""
    n = len(labels)
    yy, xx = _grid(size)
    body = 0.55 + 0.25 * (1 - xx**2) + _u(rng, -0.1, 0.1, n) * yy
    lungs = _lungs(rng, yy, xx, n, (-0.1, 0.05), (0.35, 0.45), (0.22, 0.28), (0.5, 0.6))
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


# ------------------------------------------------------------------------------ the hard family
# Each generator draws every random number whatever the labels (the same count, in the same order),
# so two calls with one generator state and different labels give images that differ only in the
# label's cue: the tests rely on it. ``clean=True`` leaves out the pixel noise and the distractors.


def _lines(u: np.ndarray, period: np.ndarray, phase: np.ndarray, sharp: float = 4.0) -> np.ndarray:
    """Thin bright lines across ``u`` every ``period`` (values in [0, 1], 1 on a line)."""
    return ((1 + np.cos(2 * np.pi * (u / period + phase))) / 2) ** sharp


def _blobs(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: np.ndarray, cx: np.ndarray,
           spread: np.ndarray, count: int, sigma: tuple[float, float]) -> np.ndarray:
    """``count`` small Gaussian spots per image (max-combined, peak 1) scattered about ``(cy, cx)``
    within ``spread`` (each ``[N, 1, 1]``)."""
    n = len(cy)
    out = np.zeros((n, yy.shape[1], xx.shape[2]), np.float32)
    for _ in range(count):
        r, a = np.sqrt(_u(rng, 0, 1, n)) * spread, _u(rng, 0, 2 * np.pi, n)
        s = _u(rng, *sigma, n)
        by, bx = cy + r * np.sin(a), cx + r * np.cos(a)
        out = np.maximum(out, np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * s**2)))
    return out


def _hard_ultrasound(rng: np.random.Generator, labels: np.ndarray, size: int, clean: bool = False) -> np.ndarray:
    """Grayscale: a hypoechoic lesion; label = 2 x margin (smooth / microlobulated) + internal
    echoes (none / a few faint echogenic foci). Posterior enhancement or shadowing, the basic
    family's cue, is drawn independently of the label here (a distractor)."""
    n = len(labels)
    yy, xx = _grid(size)
    cy, cx = _u(rng, -0.35, 0.35, n), _u(rng, -0.35, 0.35, n)
    r0, aspect, rot = _u(rng, 0.3, 0.55, n), _u(rng, 0.6, 1.0, n), _u(rng, 0, np.pi, n)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / aspect
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    lobed = ((labels // 2) == 1)[:, None, None]
    amp = np.where(lobed, _u(rng, 0.06, 0.11, n), _u(rng, 0.0, 0.03, n))
    freq = rng.integers(6, 10, n).astype(np.float32)[:, None, None]
    radius = r0 * (1 + amp * np.sin(freq * theta + _u(rng, 0, 2 * np.pi, n)) + _u(rng, -0.08, 0.08, n) * np.cos(2 * theta))
    inside = 1 / (1 + np.exp(-(radius - rho) / 0.03))
    tissue = _u(rng, 0.4, 0.75, n) * (1.0 - _u(rng, 0.15, 0.45, n) * (yy + 1) / 2)
    below = 1 / (1 + np.exp(-(yy - cy - r0) / 0.05)) * np.exp(-(((xx - cx) / r0) ** 4))
    posterior = _u(rng, -0.3, 0.3, n)
    foci = _blobs(rng, yy, xx, cy, cx, 0.6 * r0 * aspect, 4, (0.035, 0.05))
    foci = foci * _u(rng, 0.12, 0.22, n) * ((labels % 2) == 1)[:, None, None] * inside
    echo = tissue * (1 - inside * _u(rng, 0.6, 0.85, n) + foci) * (1 + posterior * below)
    speckle = rng.gamma(100.0, 1 / 100.0, size=(n, size, size)).astype(np.float32)
    return _to_uint8(echo if clean else echo * speckle)


def _hard_xray(rng: np.random.Generator, labels: np.ndarray, size: int, clean: bool = False) -> np.ndarray:
    """Grayscale chest-like image; label = the faint pattern in one zone of the lungs: none (0),
    reticular grid of fine lines (1), miliary nodules (2), ground-glass haze (3). Ribs (bright
    bands across the lungs, random period) are a distractor."""
    n = len(labels)
    yy, xx = _grid(size)
    body = 0.55 + _u(rng, 0.15, 0.3, n) * (1 - xx**2) + _u(rng, -0.1, 0.1, n) * yy
    lungs = _lungs(rng, yy, xx, n, (-0.12, 0.05), (0.33, 0.47), (0.2, 0.3), (0.48, 0.62))
    img = body - _u(rng, 0.3, 0.5, n) * lungs
    ribs = _lines(yy + _u(rng, 0.2, 0.5, n) * xx**2, _u(rng, 0.3, 0.42, n), _u(rng, 0, 1, n), 2.0)
    img = img + (0.0 if clean else _u(rng, 0.03, 0.07, n) * ribs * lungs)
    # the zone: a blob of the lungs around a random point of one lung
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
    zy, zx = _u(rng, -0.35, 0.25, n), side * _u(rng, 0.3, 0.5, n)
    zone = np.exp(-((yy - zy) ** 2 + (xx - zx) ** 2) / (2 * _u(rng, 0.22, 0.3, n) ** 2)) * np.minimum(lungs, 1)
    phi = _u(rng, 0, np.pi, n)
    gu, gv = xx * np.cos(phi) + yy * np.sin(phi), -xx * np.sin(phi) + yy * np.cos(phi)
    period, phase = _u(rng, 0.28, 0.36, n), _u(rng, 0, 1, n)
    grid = np.maximum(_lines(gu, period, phase), _lines(gv, period, phase))
    nodules = _blobs(rng, yy, xx, zy, zx, _u(rng, 0.2, 0.28, n), 10, (0.04, 0.055))
    pattern = np.select([labels[:, None, None] == 1, labels[:, None, None] == 2, labels[:, None, None] == 3],
                        [grid, nodules, np.full_like(grid, 0.55)], 0.0)
    img = img + _u(rng, 0.2, 0.3, n) * pattern * zone
    img = (img - 0.5) * _u(rng, 0.7, 1.3, n) + 0.5 + _u(rng, -0.08, 0.08, n)
    if not clean:
        img = img + rng.normal(0, 0.03, (n, size, size)).astype(np.float32)
    return _to_uint8(img)


def _hard_dermoscopy(rng: np.random.Generator, labels: np.ndarray, size: int, clean: bool = False) -> np.ndarray:
    """RGB skin with a lesion; label = its dermoscopic structure: homogeneous (0), globules (1),
    pigment network (2), peripheral radial streaks (3). The lesion's colour (brown to blue-grey,
    the basic family's cue), skin tone, shape, blotches and hairs are nuisance."""
    n = len(labels)
    yy, xx = _grid(size)
    skin = np.stack([_u(rng, 0.7, 0.95, n), _u(rng, 0.5, 0.72, n), _u(rng, 0.4, 0.62, n)], -1)
    shade = (1 + 0.1 * (_u(rng, -1, 1, n) * xx + _u(rng, -1, 1, n) * yy))[..., None]
    cy, cx = _u(rng, -0.25, 0.25, n), _u(rng, -0.25, 0.25, n)
    ry, rx, rot = _u(rng, 0.4, 0.65, n), _u(rng, 0.4, 0.65, n), _u(rng, 0, np.pi, n)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    rho, theta = np.hypot(u / rx, v / ry), np.arctan2(v, u)
    rho = rho / (1 + _u(rng, 0.0, 0.12, n) * np.sin(rng.integers(2, 5, n)[:, None, None] * theta + _u(rng, 0, 6.3, n)))
    mask = 1 / (1 + np.exp((rho - 1) / 0.08))
    brown = np.stack([_u(rng, 0.35, 0.5, n), _u(rng, 0.2, 0.3, n), _u(rng, 0.1, 0.18, n)], -1)
    grey = np.stack([_u(rng, 0.3, 0.42, n), _u(rng, 0.33, 0.45, n), _u(rng, 0.45, 0.6, n)], -1)
    mix = _u(rng, 0, 1, n)[..., None]
    lesion = brown * (1 - mix) + grey * mix
    blotch = _blobs(rng, yy, xx, cy, cx, 0.5 * np.minimum(rx, ry), 2, (0.15, 0.25)) * _u(rng, -0.25, 0.25, n)
    period, phase, phi = _u(rng, 0.28, 0.36, n), _u(rng, 0, 1, n), _u(rng, 0, np.pi, n)
    gu, gv = dx * np.cos(phi) + dy * np.sin(phi), -dx * np.sin(phi) + dy * np.cos(phi)
    network = np.maximum(_lines(gu, period, phase), _lines(gv, period, phase)) * (rho < 0.9)
    globules = _blobs(rng, yy, xx, cy, cx, 0.75 * np.minimum(rx, ry), 7, (0.04, 0.06))
    spokes = rng.integers(9, 14, n).astype(np.float32)[:, None, None]
    streaks = _lines(spokes * theta / (2 * np.pi), np.ones_like(phase), phase) * np.exp(-((rho - 0.95) / 0.2) ** 2)
    lab = labels[:, None, None]
    pattern = np.select([lab == 1, lab == 2, lab == 3], [globules, network, streaks], 0.0)
    dark = 1 - _u(rng, 0.22, 0.38, n) * pattern + blotch
    img = (skin * (1 - mask[..., None]) + (lesion * dark[..., None]) * mask[..., None]) * shade
    hairs = np.zeros((n, size, size), np.float32)
    for _ in range(2):
        a, off, on = _u(rng, 0, np.pi, n), _u(rng, -0.9, 0.9, n), rng.random(n)[:, None, None] < 0.5
        hairs = np.maximum(hairs, on * np.exp(-((xx * np.cos(a) + yy * np.sin(a) - off) / 0.04) ** 2))
    if not clean:
        img = img * (1 - 0.6 * hairs[..., None]) + rng.normal(0, 0.025, img.shape).astype(np.float32)
    return _to_uint8(img)


def _hard_pathology(rng: np.random.Generator, labels: np.ndarray, size: int, clean: bool = False) -> np.ndarray:
    """RGB H&E-like tissue; label = the nuclei's shape at a random density: round (0), elongated
    and aligned (1), large and pleomorphic (2)."""
    n = len(labels)
    yy, xx = _grid(size)
    counts = rng.integers(6, 16, n)
    align = _u(rng, 0, np.pi, n)
    lab = labels[:, None, None]
    stain = np.zeros((n, size, size), np.float32)
    for k in range(15):
        on = (k < counts).astype(np.float32)[:, None, None]
        ny, nx = _u(rng, -0.95, 0.95, n), _u(rng, -0.95, 0.95, n)
        s, stretch, jitter, big = _u(rng, 0.045, 0.065, n), _u(rng, 1.35, 1.8, n), _u(rng, -0.4, 0.4, n), _u(rng, 1.1, 1.4, n)
        a = np.where(lab == 2, _u(rng, 0, np.pi, n), align + jitter)
        sl = np.select([lab == 1, lab == 2], [s * stretch, s * big], s)
        sw = np.select([lab == 1, lab == 2], [s / stretch ** 0.5, s * big / _u(rng, 1.0, 1.5, n)], s)
        du, dv = (xx - nx) * np.cos(a) + (yy - ny) * np.sin(a), -(xx - nx) * np.sin(a) + (yy - ny) * np.cos(a)
        stain = np.maximum(stain, on * np.exp(-(du**2 / (2 * sl**2) + dv**2 / (2 * sw**2))))
    eosin = np.stack([_u(rng, 0.85, 0.97, n), _u(rng, 0.55, 0.75, n), _u(rng, 0.75, 0.9, n)], -1)
    hema = np.stack([_u(rng, 0.3, 0.45, n), _u(rng, 0.15, 0.3, n), _u(rng, 0.5, 0.65, n)], -1)
    img = eosin * (1 - stain[..., None]) + hema * stain[..., None]
    return _to_uint8(img if clean else img + rng.normal(0, 0.04, img.shape).astype(np.float32))


#: (name, channels, num_classes, generator), in the order ``make_synthetic_tasks`` uses them.
MODALITIES: tuple[tuple[str, int, int, Generator], ...] = (
    ("synth_ultrasound", 1, 2, _ultrasound),
    ("synth_xray", 1, 3, _xray),
    ("synth_dermoscopy", 3, 4, _dermoscopy),
    ("synth_pathology", 3, 3, _pathology),
)

#: The hard family (``family="hard"``): the same modalities, names and looks, harder label rules.
HARD_MODALITIES: tuple[tuple[str, int, int, Generator], ...] = (
    ("synth_ultrasound", 1, 4, _hard_ultrasound),
    ("synth_xray", 1, 4, _hard_xray),
    ("synth_dermoscopy", 3, 4, _hard_dermoscopy),
    ("synth_pathology", 3, 3, _hard_pathology),
)

#: Every family of :func:`make_synthetic_tasks` by name.
FAMILIES: dict[str, tuple[tuple[str, int, int, Generator], ...]] = {"basic": MODALITIES, "hard": HARD_MODALITIES}


def make_synthetic_tasks(
    num_tasks: int = 3,
    size: int = 28,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 300,
    seed: int = 0,
    family: str = "basic",
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
        family: ``"basic"`` (the label rules of the table above) or ``"hard"`` (the module doc's
            second table: subtle cues that need many images).

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
    if family not in FAMILIES:
        raise DataError(f"make_synthetic_tasks: family must be one of {', '.join(FAMILIES)}, got {family!r}")
    modalities = FAMILIES[family]
    counts = dict(zip(SPLITS, (n_train, n_val, n_test)))
    tasks = []
    for t in range(num_tasks):
        name, channels, num_classes, generate = modalities[t % len(modalities)]
        if t >= len(modalities):
            name = f"{name}_{t // len(modalities) + 1}"
        images, labels = {}, {}
        for s, split in enumerate(SPLITS):
            rng = np.random.default_rng([seed, t, s])
            labs = rng.permutation(np.arange(counts[split]) % num_classes).astype(np.int64)
            images[split], labels[split] = generate(rng, labs, size), labs
        tasks.append(ClassificationTask(name, images, labels, num_classes, channels, "synthetic"))
    return tasks
