"""Reprogramming Distillation (RD; Zhou et al., MICCAI 2024): a frozen foundation model, a small
trainable reprogramming module, and a lightweight student co-trained with it through a shared
classifier, distilled with CKA on chosen layer pairs and with soft-target KD on the logits.

Modules (2D and 3D through ``spatial_dims``):

* :class:`InputReprogram`: ``x + g(x)`` on the input ``[B, C, *spatial]``; ``g`` is two 3x3(x3)
  convolutions, the second zero-initialised, so the module is the identity at initialisation.
* :class:`FeatureReprogram`: ``f + h(f)`` on the foundation's features: pooled ``[B, F]``
  (classification) or a feature map ``[B, F, *spatial]`` (segmentation, ``h`` then pointwise, i.e.
  1x1(x1) convolutions); ``h`` is a bottleneck MLP whose last layer is zero-initialised (identity
  at initialisation).
* :class:`ReprogrammingDistiller`: the whole model. The foundation branch is
  ``classifier(feature_reprogram(foundation(input_reprogram(x))))``; the student branch is
  ``classifier(projector(student(x)))``: both branches end in the same ``classifier``
  (``Linear(F_foundation, K)``, or a 1x1 convolution for segmentation), the student reaching its
  width through ``projector`` (``Linear(F_student, F_foundation)``, or 1x1). Calling the model returns the student's logits, which is
  what is deployed: :meth:`ReprogrammingDistiller.export` merges projector and classifier into one
  linear head of a plain ``nn.Sequential(backbone, head)``.
* :func:`rd_loss`: ``CE(student) + w_f CE(foundation) + w_kd T^2 KL(foundation || student)
  + w_cka mean_pairs (1 - CKA_unbiased(student layer, foundation layer))``; the foundation side of
  the KD and CKA terms is detached (the student mimics; the reprogramming module learns from the
  foundation branch's own cross-entropy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.multitask import plain_sequential
from ..models.taps import LayerTaps
from .cka import unbiased_cka
from .losses import soft_target_kd

__all__ = ["InputReprogram", "FeatureReprogram", "ReprogrammingDistiller", "RDOutput", "rd_loss", "freeze"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def pointwise(in_dim: int, out_dim: int, dense_dims: int | None = None) -> nn.Module:
    """``Linear(in_dim, out_dim)`` on ``[B, F]``, or with ``dense_dims`` (2, 3) a 1x1(x1) convolution
    on ``[B, F, *spatial]``."""
    return nn.Linear(in_dim, out_dim) if dense_dims is None else _CONV[dense_dims](in_dim, out_dim, 1)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients of every parameter of ``module`` and put it in eval mode; returns it."""
    module.requires_grad_(False)
    return module.eval()


class InputReprogram(nn.Module):
    """``x + conv(gelu(conv(x)))`` on ``[B, C, *spatial]``; the identity at initialisation.

    Args:
        channels: ``C`` of the input.
        spatial_dims: 2 or 3.
        hidden: width of the hidden convolution.

    Raises:
        ConfigError: ``spatial_dims`` not 2 or 3, or ``hidden < 1``.
    """

    def __init__(self, channels: int, spatial_dims: int = 2, hidden: int = 8) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ConfigError(f"InputReprogram: spatial_dims must be 2 or 3, got {spatial_dims}")
        if hidden < 1:
            raise ConfigError(f"rd.input_hidden: must be >= 1, got {hidden}")
        conv = _CONV[spatial_dims]
        self.body = nn.Sequential(conv(channels, hidden, 3, padding=1), nn.GELU(), conv(hidden, channels, 3, padding=1))
        nn.init.zeros_(self.body[2].weight)
        nn.init.zeros_(self.body[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FeatureReprogram(nn.Module):
    """``f + W2 gelu(W1 f)`` on ``[B, F]`` (or pointwise on ``[B, F, *spatial]`` with ``dense_dims``),
    ``W2`` zero-initialised: the identity at initialisation.

    Raises:
        ConfigError: ``hidden < 1``.
    """

    def __init__(self, dim: int, hidden: int = 64, dense_dims: int | None = None) -> None:
        super().__init__()
        if hidden < 1:
            raise ConfigError(f"rd.feature_hidden: must be >= 1, got {hidden}")
        self.body = nn.Sequential(pointwise(dim, hidden, dense_dims), nn.GELU(), pointwise(hidden, dim, dense_dims))
        nn.init.zeros_(self.body[2].weight)
        nn.init.zeros_(self.body[2].bias)

    def forward(self, f: Tensor) -> Tensor:
        return f + self.body(f)


@dataclass
class RDOutput:
    """Both branches of one batch of ``B`` rows.

    Attributes:
        student_logits: ``[B, K]`` (segmentation: ``[B, K, *spatial]``).
        foundation_logits: the same shape (reprogrammed foundation through the shared classifier).
        pairs: one ``(student_feature, foundation_feature)`` per configured layer pair, each
            ``[B, C, *spatial]`` or ``[B, C]``.
    """

    student_logits: Tensor
    foundation_logits: Tensor
    pairs: list[tuple[Tensor, Tensor]]


class ReprogrammingDistiller(nn.Module):
    """Frozen foundation + reprogramming modules + shared classifier + co-trained student.

    Args:
        foundation: backbone ``[B, C, *spatial] -> [B, F_t]`` (segmentation: ``[B, F_t, *spatial]``); deep-copied and frozen (no
            gradients, always in eval mode, so its weights and BatchNorm statistics never change).
        foundation_dim: ``F_t``.
        student: backbone ``[B, C, *spatial] -> [B, F_s]`` (trained; deep-copied).
        student_dim: ``F_s``.
        num_classes: ``K``.
        channels, spatial_dims: of the input (for :class:`InputReprogram`).
        input_reprogram, feature_reprogram: which reprogramming modules to use (at least one).
        input_hidden, feature_hidden: their widths.
        pairs: ``(student_layer, foundation_layer)`` names (as in ``named_modules()`` of each
            backbone; of ``foundation.feature_root`` where it has one, e.g. a user's model) whose
            outputs the CKA term aligns; may be empty.
        dense: segmentation: the backbones return feature maps, classifier and projector are 1x1
            convolutions (``spatial_dims`` of them).

    Raises:
        ConfigError: neither reprogramming module; a layer name that is not in its backbone
            (key ``rd.pairs``, close names suggested).
    """

    def __init__(self, foundation: nn.Module, foundation_dim: int, student: nn.Module, student_dim: int,
                 num_classes: int, channels: int, spatial_dims: int = 2, input_reprogram: bool = True,
                 feature_reprogram: bool = True, input_hidden: int = 8, feature_hidden: int = 64,
                 pairs: Sequence[Sequence[str]] = (), dense: bool = False) -> None:
        super().__init__()
        if not (input_reprogram or feature_reprogram):
            raise ConfigError("rd: set input and/or feature to true; RD needs a reprogramming module")
        self.foundation = freeze(copy.deepcopy(foundation))
        self.input_reprogram = InputReprogram(channels, spatial_dims, input_hidden) if input_reprogram else None
        dense_dims = spatial_dims if dense else None
        self.feature_reprogram = FeatureReprogram(foundation_dim, feature_hidden, dense_dims) if feature_reprogram else None
        self.classifier = pointwise(foundation_dim, num_classes, dense_dims)
        self.projector = pointwise(student_dim, foundation_dim, dense_dims)
        self.dense_dims = dense_dims
        self.student = copy.deepcopy(student)
        self.pairs = [tuple(p) for p in pairs]
        self._student_taps = LayerTaps(self.student, [s for s, _ in self.pairs], key="rd.pairs (student layer)")
        root = getattr(self.foundation, "feature_root", self.foundation)  # a user's model: names inside it
        self._foundation_taps = LayerTaps(root, [f for _, f in self.pairs], key="rd.pairs (foundation layer)")

    def train(self, mode: bool = True) -> "ReprogrammingDistiller":
        super().train(mode)
        self.foundation.eval()  # frozen: BatchNorm keeps its running statistics
        return self

    def forward(self, x: Tensor, both: bool = False) -> Tensor | RDOutput:
        """``x`` ``[B, C, *spatial]`` -> student logits ``[B, K]``, or with ``both`` an :class:`RDOutput`."""
        student_logits = self.classifier(self.projector(self.student(x)))
        if not both:
            return student_logits
        xr = self.input_reprogram(x) if self.input_reprogram is not None else x
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.input_reprogram is not None):
            features = self.foundation(xr)
        if self.feature_reprogram is not None:
            features = self.feature_reprogram(features)
        foundation_logits = self.classifier(features)
        pairs = [(self._student_taps[s], self._foundation_taps[f]) for s, f in self.pairs]
        return RDOutput(student_logits, foundation_logits, pairs)

    def trainable_modules(self) -> nn.ModuleDict:
        """Everything trained besides the student: reprogramming modules, classifier, projector."""
        parts = {"classifier": self.classifier, "projector": self.projector}
        if self.input_reprogram is not None:
            parts["input_reprogram"] = self.input_reprogram
        if self.feature_reprogram is not None:
            parts["feature_reprogram"] = self.feature_reprogram
        return nn.ModuleDict(parts)

    @torch.no_grad()
    def export(self) -> nn.Sequential:
        """The student as a plain ``nn.Sequential(backbone, head)``, ``head = Linear(F_s, K)`` (1x1
        convolution for segmentation) with ``W = W_c W_p`` and ``b = W_c b_p + b_c`` (projector and
        classifier merged); computes the same logits as ``self(x)``."""
        wc, bc = self.classifier.weight.flatten(1), self.classifier.bias
        wp, bp = self.projector.weight.flatten(1), self.projector.bias
        head = pointwise(wp.shape[1], wc.shape[0], self.dense_dims).to(wc.device)
        head.weight.copy_((wc @ wp).view_as(head.weight))
        head.bias.copy_(wc @ bp + bc)
        return plain_sequential(copy.deepcopy(self.student), head).train(self.training)


def rd_loss(out: RDOutput, labels: Tensor, foundation_ce_weight: float = 1.0, kd_weight: float = 1.0,
            temperature: float = 4.0, cka_weight: float = 1.0, task_loss=F.cross_entropy) -> tuple[Tensor, dict[str, float]]:
    """The RD objective of one batch and its parts (floats, for logs).

    ``L(student) + foundation_ce_weight * L(foundation) + kd_weight * KD + cka_weight * mean over
    pairs of (1 - unbiased CKA)``, ``L`` = ``task_loss`` (cross-entropy; Dice + CE for segmentation,
    logged as ``ce``); KD (voxel-wise for dense logits) and CKA use the foundation side detached.
    The CKA term needs at least 4 rows (unbiased HSIC): a smaller batch skips it.
    """
    ce = task_loss(out.student_logits, labels)
    total = ce
    parts = {"ce": float(ce.detach())}
    if foundation_ce_weight > 0:
        ce_f = task_loss(out.foundation_logits, labels)
        total = total + foundation_ce_weight * ce_f
        parts["ce_foundation"] = float(ce_f.detach())
    if kd_weight > 0:
        kd = soft_target_kd(out.student_logits, out.foundation_logits.detach(), temperature)
        total = total + kd_weight * kd
        parts["kd"] = float(kd.detach())
    if cka_weight > 0 and out.pairs and labels.shape[0] >= 4:
        cka = torch.stack([1.0 - unbiased_cka(s, f.detach()) for s, f in out.pairs]).mean()
        total = total + cka_weight * cka
        parts["cka"] = float(cka.detach())
    return total, parts
