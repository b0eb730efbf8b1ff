"""Feature distillation terms of the student: its final features and pairs of named layers.

One mechanism serves both config forms: ``student.distill.feat_weight``/``feat_kind`` is the
implicit pair (final features of student and teacher: the :class:`~lorkd.models.multitask.TaskOutput`
``features``, pooled ``[B, F]`` for classification, the map ``[B, F, *spatial]`` for
segmentation) and each entry of ``student.distill.features`` an explicit pair of named layers.

Names:

* **student** names are those of the exported expert (``nn.Sequential(backbone=..., head=...)``):
  ``backbone`` (the backbone's output) or ``backbone.<layer>`` with ``<layer>`` a name inside the
  plain backbone (``backbone.layer3``; for a MONAI UNet ``backbone.model.1.submodule.0``). The same
  names serve the student with experts (whose layers sit one level deeper, under the
  :class:`~lorkd.experts.ExpertModel`: a layer with experts is read with its expert applied) and
  the baselines without.
* **teacher** names are resolved in ``getattr(teacher, "feature_root", teacher)``: a wrapper of a
  user's foundation model names the module whose layers users see; a lorkd-trained teacher has no
  ``feature_root``, so its names are those of the teacher network (``backbone.<layer>`` as well).

Layer outputs are read with forward hooks (:class:`~lorkd.models.taps.LayerTaps`): a layer called
several times in one forward gives its last output; a tuple output gives its first tensor. Inside a
student with experts the batch runs sorted by task, so those outputs are put back in input order.

:class:`FeatureDistiller` holds one learned projector per ``mse``/``cosine`` pair (a 1x1 convolution
for maps, a linear map for pooled features; ``cka`` needs none). It is trained with the student
as ``extra_modules`` of :func:`lorkd.engine.trainer.fit` (so it is in the student's checkpoints and
an exact resume restores it) and is never part of a saved network or an exported expert.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...distill import FeatureProjector, feature_pair_loss
from ...errors import ConfigError
from ...experts import ExpertModel
from ...experts.layers import ExpertLayer, TaskBatchNorm
from ...models.taps import LayerTaps, find_layer
from ..schema import Distill, FeaturePair

__all__ = ["FeatureDistiller", "FeatureTerm", "check_layer_names", "feature_terms", "student_layer_names",
           "teacher_root"]


@dataclass(frozen=True)
class FeatureTerm:
    """One feature term of the loss.

    Attributes:
        name: its key in the logs and the projectors: ``feat`` (final features) or ``feat_<i>``
            (``features[i]``).
        student, teacher: layer names, or ``None`` for the network's final features.
        weight, kind: as configured.
        key: the config key it came from (for error messages).
    """

    name: str
    student: str | None
    teacher: str | None
    weight: float
    kind: str
    key: str


def feature_terms(distill: Distill, path: str = "student.distill") -> list[FeatureTerm]:
    """The feature terms of ``distill`` with a weight > 0: the final features first, then the pairs."""
    terms = []
    if distill.feat_weight > 0:
        terms.append(FeatureTerm("feat", None, None, distill.feat_weight, distill.feat_kind, f"{path}.feat_weight"))
    terms += [FeatureTerm(f"feat_{i}", p.student, p.teacher, p.weight, p.kind, f"{path}.features[{i}]")
              for i, p in enumerate(distill.features) if p.weight > 0]
    return terms


def teacher_root(teacher: nn.Module) -> nn.Module:
    """The module whose layer names ``features[i].teacher`` refers to."""
    return getattr(teacher, "feature_root", teacher)


def student_layer_names(model: nn.Module) -> dict[str, str]:
    """``{name users give: name of the module in model}`` for a multi-task network (its ``backbone``).

    Inside a backbone with experts, the parts of a layer with experts or of a per-task norm are
    not listed (the layer itself is)."""
    backbone = model.backbone
    inner, prefix = (backbone.model, "backbone.model") if isinstance(backbone, ExpertModel) else (backbone, "backbone")
    names = {"backbone": "backbone"}
    opaque: list[str] = []
    for name, module in inner.named_modules():
        if not name or any(name.startswith(o + ".") for o in opaque):
            continue
        if isinstance(module, (ExpertLayer, TaskBatchNorm)):
            opaque.append(name)
        names[f"backbone.{name}"] = f"{prefix}.{name}"
    return names


def _student_module(names: dict[str, str], name: str, key: str) -> str:
    if name in names:
        return names[name]
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"{key}: no layer named {name!r} in the student (names are those of the exported expert: "
                      f"'backbone' or 'backbone.<layer of the backbone>'){hint}")


def check_layer_names(pairs: list[FeaturePair], student: nn.Module | None = None, teacher: nn.Module | None = None,
                      path: str = "student.distill") -> None:
    """Check every pair's ``student`` name against ``student`` and ``teacher`` name against
    ``teacher`` (each when given), whatever the pair's weight.

    Raises:
        ConfigError: naming ``<path>.features[i].student`` / ``.teacher``, with close names.
    """
    names = student_layer_names(student) if student is not None else {}
    for i, pair in enumerate(pairs):
        if student is not None:
            _student_module(names, pair.student, f"{path}.features[{i}].student")
        if teacher is not None:
            find_layer(teacher_root(teacher), pair.teacher, f"{path}.features[{i}].teacher")


class FeatureDistiller(nn.Module):
    """The feature terms of a student: taps on its layers and the teacher's, and the projectors.

    Args:
        terms: from :func:`feature_terms`.
        student: the multi-task network being trained (plain or with experts).
        teacher: the frozen teacher (called as ``teacher(x, task_ids)``, returning ``features``).
        example: one input batch ``[n, C, *spatial]`` of the run's data: a probe forward of both
            networks on it (eval mode, no grad) gives every layer's width and dims, so the
            projectors are built here.

    Raises:
        ConfigError: a bad layer name (see :func:`check_layer_names`), or a pair whose two
            outputs do not have the same number of dims (a pooled ``[B, C]`` against a map).
    """

    def __init__(self, terms: list[FeatureTerm], student: nn.Module, teacher: nn.Module, example: Tensor) -> None:
        super().__init__()
        self.terms = list(terms)
        names = student_layer_names(student)
        self._student = {t.name: _student_module(names, t.student, f"{t.key}.student") for t in terms if t.student}
        root = teacher_root(teacher)
        for t in terms:
            if t.teacher:
                find_layer(root, t.teacher, f"{t.key}.teacher")
        self._student_taps = LayerTaps(student, self._student.values())
        self._teacher_taps = LayerTaps(root, [t.teacher for t in terms if t.teacher])
        self.projectors = nn.ModuleDict()
        try:
            shapes = self._probe(student, teacher, example)
            for t in terms:
                s, te = shapes[t.name]
                if len(s) != len(te):
                    raise ConfigError(f"{t.key}: the student output {_shape(s)} and the teacher output {_shape(te)} "
                                      "need the same number of dims (both pooled [B, C] or both maps [B, C, *spatial])")
                if t.kind != "cka":
                    self.projectors[t.name] = FeatureProjector(s[1], te[1], spatial_dims=len(s) - 2)
        except BaseException:
            self.close()
            raise

    @torch.no_grad()
    def _probe(self, student: nn.Module, teacher: nn.Module, example: Tensor) -> dict[str, tuple[tuple[int, ...], ...]]:
        was_training = student.training
        device = next(student.parameters()).device
        x = example.to(device)
        ids = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        try:
            student.eval()
            pairs = self.collect(student(x, ids), teacher.eval()(x, ids))
        finally:
            student.train(was_training)
        return {name: (tuple(s.shape), tuple(t.shape)) for name, (s, t) in pairs.items()}

    def collect(self, out, teacher_out) -> dict[str, tuple[Tensor, Tensor]]:
        """``{term name: (student output, teacher output (detached))}`` of the forward just run,
        rows in input order; forgets the kept outputs."""
        result = {}
        for t in self.terms:
            s = out.features if t.student is None else self._student_taps[self._student[t.name]]
            te = teacher_out.features if t.teacher is None else self._teacher_taps[t.teacher]
            result[t.name] = (s, te.detach())
        self._student_taps.clear()
        self._teacher_taps.clear()
        return result

    def loss(self, term: FeatureTerm, student: Tensor, teacher: Tensor) -> Tensor:
        """The term's loss on rows of the outputs :meth:`collect` gave (0-dim tensor)."""
        projector = self.projectors[term.name] if term.name in self.projectors else None
        return feature_pair_loss(student, teacher, term.kind, projector)

    def close(self) -> None:
        """Remove the hooks (the projectors stay)."""
        self._student_taps.remove()
        self._teacher_taps.remove()


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"
