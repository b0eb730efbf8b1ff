"""lorkd: Low-Rank Knowledge Decomposition of a medical foundation model into per-task experts.

>>> import lorkd
>>> student = lorkd.add_experts(model, num_tasks=3, rank=4, alpha=16)
>>> y = student(x, task_ids)            # one pass over a batch that mixes tasks
>>> expert = student.extract(1)         # a plain model of type(model), expert 1 merged in

Your own foundation model as the teacher (any ``nn.Module``, or one loaded from a file):

>>> fm = lorkd.load_foundation("state_dict", "dn121.pt", factory="monai.networks.nets:DenseNet121",
...                            kwargs={...}, strip_prefix="module.")
>>> teacher = lorkd.Foundation(fm, num_classes=[2, 2], example=x, features="features.denseblock4")
>>> out = teacher(x, task_ids)          # TaskOutput: features [B, F], logits per task

Which N training images to keep (DiSF's greedy on features; ``kcenter``, ``random``):

>>> rows = lorkd.select(features, 1000, method="diverse")        # [N, D] -> 1000 row indices, in pick order
>>> keep = lorkd.select_for_task(teacher, task, 100, "diverse")  # class-stratified, sorted train indices
"""

from .errors import ConfigError, DataError, LorkdError, TrainingError
from .experts import (
    ExpertModel,
    add_experts,
    build_architecture,
    keep_absent_experts,
    list_adapters,
    load_adapter,
    load_expert,
    load_student,
    read_adapter,
    save_adapter,
    save_adapters,
    save_expert,
    save_student,
)
from .models.foundation import load_foundation
from .models.teacher import Foundation, InputAdapter

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lorkd.decompose`` / ``lorkd.DecompositionResult``: the whole decomposition from Python
    (:func:`lorkd.pipelines.decompose`), loaded on first use so that ``import lorkd`` stays light
    (the recipes it needs double the import time); ``lorkd.select`` / ``lorkd.select_for_task``
    (:mod:`lorkd.data.select`) likewise."""
    if name in ("decompose", "DecompositionResult"):
        from . import pipelines

        return getattr(pipelines, name)
    if name in ("select", "select_for_task"):  # the data layer's MedMNIST code stays out of `import lorkd.engine`
        from .data import select as selection

        return getattr(selection, name)
    raise AttributeError(f"module 'lorkd' has no attribute {name!r}")

__all__ = [
    "ConfigError", "DataError", "ExpertModel", "Foundation", "InputAdapter", "load_foundation", "LorkdError", "TrainingError", "add_experts",
    "build_architecture", "keep_absent_experts", "list_adapters", "load_adapter", "load_expert", "load_student", "read_adapter", "save_adapter",
    "save_adapters", "save_expert", "save_student", "select", "select_for_task", "__version__", "decompose", "DecompositionResult",
]
