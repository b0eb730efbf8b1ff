"""``data.select``: the classification recipe's ``data.max_train`` subset chosen on the foundation
model's features (:mod:`lorkd.data.select`), recorded in the run folder and reused.

``<run>/selection.json`` (or ``data.select.file``) holds ``method``, ``features``, ``max_train``,
``cap_seed``, ``teacher`` (sha256 of the foundation model's own weights, not of the heads lorkd
fits), ``pool`` (training images per task before the cut) and ``indices`` (per task, sorted, into
the task's training split). A later construction of the recipe (another stage, ``--resume``,
another seed pointing ``file`` at the same record) reads it back while all but ``indices`` match, so every model of the run trains on the same
images; otherwise the selection is made again and the file rewritten. Its digest goes into every
stage's fingerprint as ``data.selection`` (:mod:`lorkd.pipelines.core.fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ...data.medmnist import ClassificationTask, keep_train
from ...data.select import select_for_task
from ...errors import DataError
from ...experts.adapters import tensors_digest
from ...fileio import read_json, write_json
from ..core.recipe import DecompositionRecipe
from ..stages.adapt import build_foundation, build_from_meta

log = logging.getLogger("lorkd")

SELECTION = "selection.json"


def selection_path(run: DecompositionRecipe) -> Path:
    """``data.select.file`` when given, else ``<run>/selection.json``."""
    file = run.cfg.data.select.file
    return Path(file).expanduser() if file else run.out / SELECTION


def foundation(run: DecompositionRecipe) -> nn.Module:
    """The run's ``teacher.source`` as a lorkd multi-task network, not adapted (a lorkd teacher
    folder as saved), in eval mode on the run's device."""
    src = run.cfg.teacher.source
    if src.kind == "lorkd":
        model = run.reuse_network(Path(src.path).expanduser(), build=lambda meta: build_from_meta(run, meta))
    else:
        model = build_foundation(run).freeze_backbone(True)
    return model.to(run.ctx.device).eval()


def select_training(run: DecompositionRecipe, pool: list[ClassificationTask]) -> list[ClassificationTask]:
    """``pool`` with each task's training split cut to the ``data.max_train`` images that
    ``data.select`` chooses (read from :func:`selection_path` when it matches, else chosen and
    written there and, when that is elsewhere, into the run folder too). Sets
    ``run.state.fingerprint_extra["data.selection"]``.

    Raises:
        DataError: a task's pool holds fewer than ``data.max_train`` images (names the task); a
            corrupt selection file (names it).
        ConfigError: the foundation model cannot be loaded, or ``data.select.features`` is not one
            of its layers (names the key).
    """
    d, path = run.cfg.data, selection_path(run)
    for task in pool:
        if task.num_samples("train") < d.max_train:
            raise DataError(f"data.max_train: {d.max_train} images for task {task.name!r} with data.select.method "
                            f"{d.select.method}, but its training split holds only {task.num_samples('train')}")
    model = foundation(run)
    want = {"method": d.select.method, "features": d.select.features, "max_train": d.max_train,
            "cap_seed": d.cap_seed, "teacher": tensors_digest(model.feature_root.state_dict()),
            "pool": {t.name: t.num_samples("train") for t in pool}}
    record = read_json(path) if path.is_file() else {}
    if {k: record.get(k) for k in want} == want and set(record.get("indices", {})) == set(want["pool"]):
        log.info("data.select: %s subset read from %s", d.select.method, path)
    else:
        record = {**want, "indices": {t.name: choose(run, model, t).tolist() for t in pool}}
    if run.ctx.is_main:
        for target in {path, run.out / SELECTION}:
            if not target.is_file() or read_json(target) != record:
                write_json(target, record)
    run.state.fingerprint_extra["data.selection"] = hashlib.sha256(
        json.dumps(record, sort_keys=True).encode()).hexdigest()
    return [keep_train(t, np.asarray(record["indices"][t.name], dtype=np.int64)) for t in pool]


def choose(run: DecompositionRecipe, model: nn.Module, task: ClassificationTask) -> np.ndarray:
    """The ``data.select`` subset of one task on ``model``'s features (logs the time it took)."""
    d = run.cfg.data
    keep = select_for_task(model, task, d.max_train, d.select.method, d.select.features, d.select.batch_size,
                           d.cap_seed, run.ctx.device, size=d.size, channels=run.channels, mean=d.mean, std=d.std)
    log.info("data.select: %d of %d training images of %s chosen (%s)", len(keep), task.num_samples("train"),
             task.name, d.select.method)
    return keep


def selection_summary(path: Path) -> dict[str, Any] | None:
    """What ``metrics.json`` says of the selection: the record without its indices (``None``: no file)."""
    return {k: v for k, v in read_json(path).items() if k != "indices"} if path.is_file() else None
