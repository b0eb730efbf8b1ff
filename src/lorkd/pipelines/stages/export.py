"""The export stage: one plain expert per task, ``experts/<task>/`` (safetensors + ``card.json``,
and the ``export`` formats: ONNX, TorchScript, a MONAI bundle, each checked against PyTorch)."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from ...experts import save_expert
from ..core.bundle import BUNDLE_DIR, check_bundle, write_bundle
from ..core.export_formats import write_formats
from ..core.recipe import DecompositionRecipe


def stage_export(run: DecompositionRecipe, student: nn.Module) -> dict[str, Path]:
    """Write task ``t``'s expert (the student with expert ``t`` merged, + its head) with the card of
    :meth:`~DecompositionRecipe.expert_card`; dense recipes export dynamic spatial axes."""
    folders = {}
    ex = run.cfg.export
    for t, name in enumerate(run.names):
        expert, spec = student.export_task(t)
        card = run.expert_card(t)
        card["files"] = write_formats(expert, run.out / "experts" / name, run.export_input_shape(t), onnx=ex.onnx,
                                      torchscript=ex.torchscript, opset=ex.opset, dynamic_spatial=run.dense)
        bundle = run.out / "experts" / name / BUNDLE_DIR
        shutil.rmtree(bundle, ignore_errors=True)  # a stale bundle of an earlier export
        if ex.bundle:
            write_bundle(expert, spec, card, bundle)
            card["files"].append(check_bundle(expert, bundle, run.export_input_shape(t)))
        folders[name] = save_expert(expert, run.out / "experts" / name, architecture=spec, card=card)
    return folders
