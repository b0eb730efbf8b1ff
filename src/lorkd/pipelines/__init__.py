"""The recipes (classification, segmentation, transfer), their stages and the Python entry point of a
whole decomposition, :func:`decompose` (:mod:`lorkd.pipelines.recipes.memory`; not exported from
``lorkd`` itself, whose import stays light: importing this package loads the recipes).

>>> from lorkd.pipelines import Task, decompose
>>> result = decompose(teacher, [Task("a", images, labels), ...], {"student": {"train": {"epochs": 5}}})
>>> result.experts["a"](x)              # plain expert of task "a": [B, C, H, W] -> [B, classes]
"""

from ..data.memory import Task
from .recipes.memory import DecompositionResult, InMemoryClassificationRecipe, decompose

__all__ = ["DecompositionResult", "InMemoryClassificationRecipe", "Task", "decompose"]
