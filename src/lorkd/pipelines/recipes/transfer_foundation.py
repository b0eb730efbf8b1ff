"""The foundation model of ``lorkd transfer`` and the experts decomposed from it.

The ``foundation`` section names one of:

* ``run``: a ``lorkd run`` folder: its ``teacher/`` is the foundation model (its own network, or
  the model it loaded from ``teacher.source``, with the run's weights), its ``experts/`` the
  experts (:func:`foundation_from_run`);
* ``source``: any foundation model, with exactly the ``teacher.source`` schema of the recipes
  (:class:`~lorkd.pipelines.schema.TeacherSource`, loaded by :func:`lorkd.models.foundation.load_foundation`;
  kind ``lorkd``: a ``teacher/`` folder), plus ``features`` (the layer whose output is the
  feature, a name inside the user's module as :mod:`lorkd.models.taps` resolves it), ``input`` (the
  teacher input adapter, :class:`~lorkd.models.teacher.InputAdapter`) and ``experts`` (a folder of
  exported experts, or a run folder whose ``experts/`` is used) (:func:`foundation_from_source`).

Either way the result is a :class:`TransferFoundation` whose ``backbone`` maps the downstream
input ``[B, C, *spatial]`` (what the experts take) to pooled features ``[B, F]`` (segmentation: a
feature map ``[B, F, *spatial]``); the transfer methods put their heads on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safetensors.torch import load_file

from ...config import from_dict, load_yaml
from ...data.paths import locate
from ...errors import ConfigError
from ...fileio import read_json
from ...models.classifier import MultiTaskClassifier
from ...models.foundation import load_foundation, load_weights
from ...models.segmenter import MultiTaskSegmenter
from ...models.taps import LayerTaps, find_layer
from ...models.teacher import InputAdapter, first_conv_channels, output_tensor, resize_map
from ..core.netio import META, has_network, load_network
from ..schema import TeacherSection

__all__ = ["TransferFoundation", "FoundationFeatures", "load_transfer_foundation", "foundation_from_run",
           "foundation_from_source", "train_only_used"]


@dataclass
class TransferFoundation:
    """A frozen-able foundation model and the experts decomposed from it.

    Attributes:
        backbone: ``[B, C, *spatial] -> [B, F]`` pooled features (``dense``: ``[B, F, *spatial]``).
        feature_dim: ``F``.
        backbone_spec: its lorkd architecture spec (see :func:`lorkd.experts.build_architecture`);
            ``None`` for a ``source`` model, which lorkd cannot rebuild from a spec.
        channels, spatial_dims, size, mean, std: the input it takes (``size`` ``None``: the images'
            own size); for a ``source`` model, the experts' input (its ``input`` adapter maps that
            to what the model expects).
        tasks: names of the tasks it (and the experts) were trained on.
        task_files: the files of those tasks, where known.
        experts: expert name -> its folder (``save_expert`` format).
        source: a description for the report.
        dense: a segmentation model (features ``[B, F, *spatial]``).
        example: a ``[2, C, *spatial]`` input batch (``source`` models: to find untrained parameters).
    """

    backbone: nn.Module
    feature_dim: int
    backbone_spec: dict[str, Any] | None
    channels: int
    spatial_dims: int
    size: int | None
    mean: float
    std: float
    tasks: list[str]
    task_files: list[Path]
    experts: dict[str, Path]
    source: str
    dense: bool = False
    example: Tensor | None = None


def load_transfer_foundation(section: Any, key: str = "foundation") -> TransferFoundation:
    """The foundation model and experts that ``section`` (a ``FoundationSection``) names.

    Raises:
        ConfigError: no source given, or the source is unusable (see :func:`foundation_from_run`,
            :func:`foundation_from_source`).
    """
    if getattr(section, "run", None):
        return foundation_from_run(Path(section.run).expanduser(), section.experts, key)
    if getattr(section, "source", None) is not None:
        return foundation_from_source(section, key)
    raise ConfigError(f"{key}: give run (a lorkd run folder with teacher/ and experts/) or source (+ experts)")


# ---------------------------------------------------------------------------------------- lorkd runs
def _lorkd_teacher(teacher_dir: Path, key: str, hint: str) -> tuple[nn.Module, dict[str, Any], bool]:
    """The network saved in a lorkd ``teacher/`` folder, its meta, and whether it segments.

    Raises:
        ConfigError: no trained network there, or one loaded from a ``teacher.source`` (its run's
            teacher is rebuilt from that source: give the source instead).
        DataError: the teacher's files are corrupt.
    """
    if not has_network(teacher_dir):
        raise ConfigError(f"{key}: {teacher_dir} holds no trained foundation model (model.safetensors + {META}); {hint}")
    meta = read_json(teacher_dir / META)
    if "ensemble" in meta:
        raise ConfigError(f"{key}: the teacher in {teacher_dir} is an ensemble of {len(meta['ensemble']['members'])} "
                          "teachers; transfer starts from one foundation model: give one member as foundation.source")
    if "foundation" in meta:
        raise ConfigError(f"{key}: the teacher in {teacher_dir} was loaded from teacher.source "
                          f"({meta['foundation'].get('source', {}).get('path')}); give its run folder as foundation.run")
    dense = meta.get("task_kind") == "segmentation"
    model, meta = load_network(teacher_dir, (MultiTaskSegmenter if dense else MultiTaskClassifier).from_meta)
    return model, meta, dense


def _experts(root: Path, names: list[str] | None, key: str, hint: str) -> dict[str, Path]:
    """Expert name -> folder of the exported experts under ``root`` (those in ``names``, or all).

    Raises:
        ConfigError: no exported expert there, or a name in ``names`` that is not one of them.
    """
    available = sorted(p.name for p in root.iterdir() if (p / "card.json").is_file()) if root.is_dir() else []
    if not available:
        raise ConfigError(f"{key}: {root} holds no exported expert; {hint}")
    wanted = list(names) if names else available
    for name in wanted:
        if name not in available:
            raise ConfigError(f"{key}: no expert {name!r} in {root}; the run has {available}")
    return {n: root / n for n in wanted}


def _task_files(run: Path) -> list[Path]:
    """The task files of the run in folder ``run`` (from its ``config.yaml``; none if absent)."""
    if not (run / "config.yaml").is_file():
        return []
    tasks = (load_yaml(run / "config.yaml").get("data") or {}).get("tasks") or []
    return [locate(t["path"], f"{run / 'config.yaml'}: data.tasks") for t in tasks if isinstance(t, dict) and "path" in t]


def foundation_from_run(run: Path, expert_names: list[str] | None = None, key: str = "foundation") -> TransferFoundation:
    """The ``teacher/`` and ``experts/`` of a ``lorkd run`` folder (classification or segmentation).
    A teacher the run loaded from ``teacher.source`` is rebuilt from that source with the run's
    weights, ``features`` and ``input`` (see :func:`foundation_from_source`).

    Raises:
        ConfigError: no trained teacher there, no exported experts, or an expert in
            ``expert_names`` that the run does not have (names the folder and the choices).
        DataError: the teacher's files are corrupt.
    """
    if has_network(run / "teacher") and "foundation" in read_json(run / "teacher" / META):
        return _source_teacher_of_run(run, expert_names, key)
    model, meta, dense = _lorkd_teacher(run / "teacher", f"{key}.run", f"run `lorkd run` or `lorkd pretrain` on {run} first")
    experts = _experts(run / "experts", expert_names, f"{key}.experts" if expert_names else f"{key}.run",
                       f"run `lorkd export` on {run} first")
    spec = meta["backbone"]
    return TransferFoundation(
        backbone=model.backbone, feature_dim=model.feature_dim, backbone_spec=spec, channels=int(meta["channels"]),
        spatial_dims=int(meta.get("spatial_dims", spec["kwargs"].get("spatial_dims", 2))), size=meta.get("size"),
        mean=float(meta.get("mean", 0.5)), std=float(meta.get("std", 0.5)), tasks=list(meta["tasks"]),
        task_files=_task_files(run), experts=experts, source=f"lorkd run {run} (teacher/ and experts/)", dense=dense)


def _source_teacher_of_run(run: Path, expert_names: list[str] | None, key: str) -> TransferFoundation:
    """The teacher of a run that loaded it from ``teacher.source``: rebuilt from that section (the
    source must still be there) with the run's weights (adapted, e.g. by ``finetune``).

    Raises:
        ConfigError: the source was a ``state_dict`` built from ``teacher.net`` (no ``factory``), or
            the run's weights do not fit the rebuilt model.
    """
    folder = run / "teacher"
    tcfg = from_dict(TeacherSection, read_json(folder / META)["foundation"], f"{folder / META}: teacher")
    if tcfg.source.kind == "state_dict" and not tcfg.source.factory:
        raise ConfigError(f"{key}.run: the teacher of {run} is a state dict built from teacher.net; give it as "
                          f"{key}.source with its factory (and {key}.experts: {run / 'experts'})")
    section = _Section(tcfg.source, tcfg.features, tcfg.input, str(run / "experts"))
    f = foundation_from_source(section, key, expert_names)
    state = load_file(str(folder / "model.safetensors"))
    load_weights(f.backbone.module, {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                 f"{key}.run", str(folder / "model.safetensors"))
    f.task_files = _task_files(run)
    f.source = f"teacher of lorkd run {run} (loaded from {tcfg.source.kind} {tcfg.source.path}, features " \
               f"{tcfg.features or 'its output'}, the run's weights); experts {run / 'experts'}"
    return f


@dataclass
class _Section:
    """The keys of a ``foundation`` section that :func:`foundation_from_source` reads."""

    source: Any
    features: str | None
    input: Any
    experts: str


# ---------------------------------------------------------------------------------------- any source
class FoundationFeatures(nn.Module):
    """A user's foundation model as a feature extractor: ``[B, C, *spatial] -> [B, F]`` (pooled
    over space) or, ``dense``, ``[B, F, *spatial]`` (resized to the input's size).

    ``input_adapter`` first maps the input to what ``module`` expects; the feature is the output of
    layer ``features`` of ``module`` (read with a forward hook that lives only during the call, so
    deep copies of this module stay independent), or the module's output when ``features`` is
    ``None``. Layer names in configs (``foundation.features``, the foundation side of ``rd.pairs``)
    are names inside ``module``: :attr:`feature_root`.

    Raises:
        ConfigError: ``features`` is not a layer of ``module`` (close names suggested, key
            ``{key}.features``), or is given for a TorchScript module.
    """

    def __init__(self, module: nn.Module, features: str | None = None, input_adapter: nn.Module | None = None,
                 dense: bool = False, key: str = "foundation") -> None:
        super().__init__()
        self.module, self.layer, self.dense, self.key = module, features, dense, key
        self.input_adapter = input_adapter or nn.Identity()
        if features and isinstance(module, torch.jit.ScriptModule):
            raise ConfigError(f"{key}.features: a TorchScript model runs its layers out of reach of forward hooks; "
                              "leave features unset (its output is the feature)")
        if features:
            find_layer(module, features, f"{key}.features")

    @property
    def feature_root(self) -> nn.Module:
        """The user's module: foundation layer names in configs are names inside it."""
        return self.module

    def forward(self, x: Tensor) -> Tensor:
        if self.layer is None:
            f = output_tensor(self.module(self.input_adapter(x)), self.key)
        else:
            with LayerTaps(self.module, [self.layer], key=f"{self.key}.features") as taps:
                self.module(self.input_adapter(x))
                f = taps[self.layer]
        if not self.dense:
            return f.flatten(2).mean(2) if f.ndim > 2 else f
        return resize_map(f, x.shape[2:], f"{self.key}.features")


def _expert_input(experts: dict[str, Path], key: str) -> dict[str, Any]:
    """The input every expert takes (from their cards): channels, spatial dims, size, normalisation.

    Raises:
        ConfigError: the experts disagree on it.
    """
    seen = {}
    for name, folder in experts.items():
        card = read_json(folder / "card.json")
        dense = card.get("task_kind") == "segmentation"
        size = card.get("patch_size") if dense else card.get("input_size")
        norm = card.get("normalisation") or {}
        seen[name] = {"channels": int(card.get("input_channels", 1)), "spatial_dims": int(card.get("spatial_dims", 2)),
                      "size": size, "mean": norm.get("mean"), "std": norm.get("std"), "dense": dense}
    first = next(iter(seen.values()))
    for name, got in seen.items():
        if {k: v for k, v in got.items() if k != "size"} != {k: v for k, v in first.items() if k != "size"}:
            raise ConfigError(f"{key}: the experts take different inputs ({seen}); list experts of one run")
    return first


def foundation_from_source(section: Any, key: str = "foundation", expert_names: list[str] | None = None) -> TransferFoundation:
    """A foundation model loaded from ``section.source`` (the ``teacher.source`` schema) and the
    experts of ``section.experts`` (those in ``expert_names``, or all); the downstream input is the experts' (channels, spatial
    dims, size, normalisation, from their cards), mapped to the model by ``section.input``.

    Raises:
        ConfigError: a missing file or folder, a source that does not load (see
            :func:`lorkd.models.foundation.load_foundation`), a ``features`` layer that does not
            exist (close names suggested), a model that rejects the experts' input or whose
            input channels do not match and no ``input.channels`` mode is set; each names its key.
    """
    src, inp = section.source, section.input
    root = Path(section.experts).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{key}.experts: folder {root} not found (give RUN/experts or a lorkd run folder)")
    if (root / "experts").is_dir():
        root = root / "experts"
    experts = _experts(root, expert_names, f"{key}.experts", "export them with `lorkd export`")
    want = _expert_input(experts, f"{key}.experts")
    channels, dims, dense = want["channels"], want["spatial_dims"], want["dense"]
    size = want["size"]
    sizes = [int(size)] * dims if isinstance(size, int) else list(size) if size else [28] * dims
    tasks = [read_json(f / "card.json").get("task", n) for n, f in experts.items()]
    common = dict(channels=channels, spatial_dims=dims, size=size if isinstance(size, int) else None,
                  mean=float(want["mean"] if want["mean"] is not None else 0.5),
                  std=float(want["std"] if want["std"] is not None else 0.5), tasks=tasks,
                  task_files=_task_files(root.parent), experts=experts, dense=dense)
    if src.kind == "lorkd":
        model, meta, teacher_dense = _lorkd_teacher(Path(src.path).expanduser(), f"{key}.source.path",
                                                    "give a teacher/ folder of a finished lorkd run")
        if (int(meta["channels"]), int(meta.get("spatial_dims", 2)), teacher_dense) != (channels, dims, dense):
            raise ConfigError(f"{key}.source.path: the teacher takes {meta['channels']}-channel "
                              f"{meta.get('spatial_dims', 2)}D input, the experts of {key}.experts "
                              f"{channels}-channel {dims}D input; give the teacher of the experts' run")
        return TransferFoundation(backbone=model.backbone, feature_dim=model.feature_dim, backbone_spec=meta["backbone"],
                                  source=f"lorkd teacher {src.path}; experts {root}", **common)
    module = load_foundation(src.kind, src.path, factory=src.factory, kwargs=src.kwargs, name=src.name,
                             strip_prefix=src.key_map.strip_prefix, rename=src.key_map.rename, strict=src.strict,
                             network_key=src.network_key, key=f"{key}.source")
    in_channels = (inp.in_channels if inp is not None else None) or first_conv_channels(module)
    if inp is None and in_channels not in (None, channels):
        raise ConfigError(f"{key}.input: the foundation model takes {in_channels} channels, the experts' data has "
                          f"{channels}; set {key}.input.channels: repeat or average")
    adapter = None
    if inp is not None:
        adapter = InputAdapter(dims, inp.size, inp.channels, in_channels, inp.mean, inp.std,
                               None if dense else common["mean"], None if dense else common["std"], key=f"{key}.input")
    backbone = FoundationFeatures(module, section.features, adapter, dense, key)
    example = torch.randn(2, channels, *sizes)
    feature_dim = _probe(backbone, example, key)
    for p in module.parameters():  # loaded frozen; which of them train is up to each method
        p.requires_grad_(True)
    text = f"{src.kind} {src.path}" + (f" ({src.factory or src.name})" if src.factory or src.name else "")
    return TransferFoundation(backbone=backbone, feature_dim=feature_dim, backbone_spec=None, example=example,
                              source=f"{text}, features {section.features or 'its output'}; experts {root}", **common)


def _probe(backbone: FoundationFeatures, example: Tensor, key: str) -> int:
    """Run ``example`` once; the feature width ``F``.

    Raises:
        ConfigError: the model rejects the input, or the ``features`` layer cannot be read.
    """
    try:
        with torch.no_grad():
            feats = backbone.eval()(example)
    except ConfigError:
        raise
    except KeyError as err:  # the hooked layer never ran (e.g. inside a TorchScript module)
        raise ConfigError(f"{key}.features: layer {backbone.layer!r} did not run in the forward pass (a TorchScript "
                          "module runs its layers out of reach of hooks; leave features unset)") from err
    except Exception as err:  # noqa: BLE001 - the user's module rejecting the input
        first = str(err).strip().splitlines()
        raise ConfigError(f"{key}: the foundation model ({type(backbone.module).__name__}) rejects an input of shape "
                          f"{list(backbone.input_adapter(example).shape)}: {type(err).__name__}: "
                          f"{first[0] if first else ''} (adapt it with {key}.input: size, channels, in_channels)") from err
    if feats.ndim < 2:
        raise ConfigError(f"{key}.features: gives shape {list(feats.shape)}; need [B, F, ...]")
    return int(feats.shape[1])


def train_only_used(model: nn.Module, example: Tensor) -> nn.Module:
    """Turn off ``requires_grad`` of the trainable parameters of ``model`` that get no gradient from
    its output on ``example`` (e.g. a foundation model's own classifier after the ``features``
    layer), so they are neither trained nor counted as trained. Runs in eval mode: no BatchNorm
    statistic changes. Returns ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    try:
        model(example).float().sum().backward()
    finally:
        model.train(was)
    for p in params:
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None
    return model

