"""lorkd: Low-Rank Knowledge Decomposition of a medical foundation model into per-task experts.

>>> import lorkd
>>> student = lorkd.add_experts(model, num_tasks=3, rank=4, alpha=16)
>>> y = student(x, task_ids)            # one pass over a batch that mixes tasks
>>> expert = student.extract(1)         # a plain model of type(model), expert 1 merged in
"""

from .errors import ConfigError, DataError, LorkdError, TrainingError
from .experts import (
    ExpertModel,
    add_experts,
    build_architecture,
    load_expert,
    load_student,
    save_expert,
    save_student,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "ExpertModel", "LorkdError", "TrainingError", "add_experts",
    "build_architecture", "load_expert", "load_student", "save_expert", "save_student", "__version__",
]
