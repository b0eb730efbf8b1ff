"""Pieces both recipes use: the distillation objective, saving networks, timing, devices."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..distill import FeatureProjector, feature_kd, soft_target_kd
from ..engine.trainer import StepLoss
from ..errors import DataError
from ..fileio import read_json, write_atomic, write_json
from .schema import Distill

WEIGHTS, META = "model.safetensors", "model.json"


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_network(model: nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (its state dict) and ``model.json`` (``meta``) atomically."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(state, tmp))
    write_json(folder / META, meta)
    return folder


def load_network(folder: Path, build: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network saved by :func:`save_network`: ``build(meta)`` then load the weights.

    Raises:
        DataError: a file is missing or corrupt, or the weights do not fit (names the file).
    """
    meta = read_json(folder / META)
    model = build(meta)
    path = folder / WEIGHTS
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(f"{path}: weights do not fit the network described in {folder / META}: {err}") from err
    except Exception as err:  # safetensors' own error types for corrupt files
        raise DataError(f"{path}: not a readable safetensors file ({err})") from err
    return model, meta


def has_network(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / META).is_file()


def global_mean(local_mean: Tensor, local_count: int, global_count: int, world_size: int) -> Tensor:
    """Rescale a task's mean over this rank's rows so that, after DDP averages gradients over
    ``world_size`` ranks, it equals the mean over the task's rows of the *global* batch."""
    return local_mean * (local_count * world_size / global_count)


class DistillObjective:
    """Per-task loss ``ce_w * CE + kd_w * T^2 KL(teacher || student) + feat_w * feature KD``.

    Each term is a mean over the task's rows of the global batch; the total is the mean over
    the tasks present in the global batch, so every task weighs the same whatever its share.

    Args:
        weights: the :class:`~lorkd.pipelines.schema.Distill` weights and temperature.
        teacher: the frozen teacher (kept in eval mode, run under ``no_grad``), or ``None``.
        projector: maps student features to the teacher's width for feature KD, or ``None``.
        world_size: number of DDP ranks.
        dense: segmentation (per-voxel terms, Dice+CE) instead of classification.
    """

    def __init__(self, weights: Distill, teacher: nn.Module | None = None, projector: FeatureProjector | None = None,
                 world_size: int = 1, task_loss: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        self.weights = weights
        self.teacher = teacher
        self.projector = projector
        self.world_size = world_size
        self.task_loss = task_loss or nn.functional.cross_entropy
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        use_teacher = weights.kd_weight > 0 or weights.feat_weight > 0
        if use_teacher and teacher is None:
            raise ValueError("distillation weights are > 0 but no teacher was given")
        if weights.feat_weight > 0 and projector is None:
            raise ValueError("feat_weight > 0 needs a feature projector")

    def __call__(self, model: nn.Module, batch: Any, global_counts: Tensor) -> StepLoss:
        out = model(batch.images, batch.task_ids)
        w = self.weights
        teacher_out = None
        if self.teacher is not None and (w.kd_weight > 0 or w.feat_weight > 0):
            with torch.no_grad():
                self.teacher.eval()
                teacher_out = self.teacher(batch.images, batch.task_ids)
        present = int((global_counts > 0).sum())
        total = out.features.new_zeros(())
        per_task, parts = {}, {"ce": 0.0, "kd": 0.0, "feat": 0.0}
        for task, logits in out.logits.items():
            rows = out.rows[task]
            scale = lambda value: global_mean(value, len(rows), int(global_counts[task]), self.world_size)  # noqa: E731
            loss = out.features.new_zeros(())
            terms = {}
            if w.ce_weight > 0:
                terms["ce"] = self.task_loss(logits, batch.labels.index_select(0, rows))
                loss = loss + w.ce_weight * scale(terms["ce"])
            if teacher_out is not None and w.kd_weight > 0:
                terms["kd"] = soft_target_kd(logits, teacher_out.logits[task], w.temperature)
                loss = loss + w.kd_weight * scale(terms["kd"])
            if teacher_out is not None and w.feat_weight > 0:
                student_f = self.projector(out.features.index_select(0, rows))
                terms["feat"] = feature_kd(student_f, teacher_out.features.index_select(0, rows), w.feat_kind)
                loss = loss + w.feat_weight * scale(terms["feat"])
            total = total + loss / present
            per_task[task] = float(loss.detach())
            for name, value in terms.items():
                parts[name] += float(value.detach()) / len(out.logits)
        return StepLoss(total=total, per_task=per_task, parts={k: v for k, v in parts.items() if k in _used(w)})


def _used(w: Distill) -> set[str]:
    return {name for name, weight in (("ce", w.ce_weight), ("kd", w.kd_weight), ("feat", w.feat_weight)) if weight > 0}


@contextmanager
def timed(timing: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timing[stage]`` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start
