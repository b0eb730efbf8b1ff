"""The recipes' configuration trees, typed and validated at load time (:func:`lorkd.config.from_dict`).

:mod:`.sections` holds what every recipe shares; :mod:`.classification`, :mod:`.segmentation` and
:mod:`.transfer` the tree of each recipe (selected by the YAML key ``recipe``); :mod:`.presets` the
demo's config."""

from .classification import ClassificationConfig, ClassificationData, Synthetic, TaskFile
from .sections import (
    BASELINES,
    Baselines,
    Distill,
    DistillSearch,
    EarlyStop,
    Evaluate,
    Experts,
    Export,
    FeaturePair,
    Logging,
    Net,
    Router,
    RouterNet,
    Stage,
    StudentSection,
    EnsembleMember,
    TeacherAdapt,
    TeacherEnsemble,
    TeacherInput,
    TeacherSection,
    TeacherSource,
    ensemble_member,
    member_labels,
)
from .segmentation import SegmentationConfig
from .transfer import METHODS, TransferConfig

CONFIGS = {c.RECIPE: c for c in (ClassificationConfig, SegmentationConfig, TransferConfig)}

__all__ = [
    "BASELINES", "CONFIGS", "EnsembleMember", "TeacherEnsemble", "ensemble_member", "member_labels", "METHODS", "Baselines", "ClassificationConfig", "ClassificationData", "Distill", "DistillSearch", "EarlyStop",
    "Evaluate", "Experts", "Export", "FeaturePair", "Logging", "Net", "Router", "RouterNet", "SegmentationConfig", "Stage", "StudentSection",
    "Synthetic", "TaskFile", "TeacherAdapt", "TeacherInput", "TeacherSection", "TeacherSource", "TransferConfig",
]
