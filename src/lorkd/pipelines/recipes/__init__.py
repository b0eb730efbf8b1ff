"""The recipes: classification and segmentation (decomposition, :mod:`lorkd.pipelines.stages`) and
transfer (``lorkd transfer``), each on the protocol of :mod:`lorkd.pipelines.core.recipe`."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...engine.distributed import DistributedContext
from ..core.recipe import DecompositionRecipe
from ..schema import ClassificationConfig, SegmentationConfig
from ..stages.describe import describe_teacher
from ..stages.drive import drive
from .classification import ClassificationRecipe
from .segmentation import SegmentationRecipe

RECIPES: dict[str, type[DecompositionRecipe]] = {r.kind: r for r in (ClassificationRecipe, SegmentationRecipe)}


def recipe_for(cfg: ClassificationConfig | SegmentationConfig) -> type[DecompositionRecipe]:
    """The decomposition recipe class of a config (by its ``recipe`` key)."""
    return RECIPES[cfg.RECIPE]


def run_stages(cfg: ClassificationConfig | SegmentationConfig, out: Path, ctx: DistributedContext,
               stages: tuple[str, ...] | None = None, resume: bool = False, progress: bool = True,
               reuse: bool = False) -> dict[str, Any] | None:
    """Build the config's recipe (reads and checks the data first) and run ``stages`` (default all)
    in order; earlier stages' outputs are reused when present (when their fingerprint matches the
    config, or with ``reuse``: see :func:`~lorkd.pipelines.stages.drive.drive`).

    Returns the metrics when ``evaluate`` ran (on rank 0), else ``None``.
    """
    recipe = recipe_for(cfg)(cfg, out, ctx, resume=resume, progress=progress)
    return drive(recipe, stages, reuse=reuse)


def describe(cfg: ClassificationConfig | SegmentationConfig) -> str:
    """What ``lorkd teacher CONFIG`` prints (:func:`~lorkd.pipelines.stages.describe.describe_teacher`),
    on the CPU, with the run folder in a temporary directory."""
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(cfg)(replace(cfg, device="cpu"), Path(tmp), ctx, progress=False)
        return describe_teacher(recipe)
