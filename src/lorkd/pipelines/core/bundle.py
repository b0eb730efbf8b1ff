"""An exported expert as a MONAI bundle: ``experts/<task>/bundle/`` (``export.bundle: true``).

The folder follows MONAI's bundle layout::

    bundle/
      configs/metadata.json   # MONAI metadata schema: versions, task, network_data_format (inputs, outputs)
      configs/inference.json  # network_def (and network, inferer; a segmenter's per-channel
                              # intensity normalisation as 'preprocessing') for monai.bundle.ConfigParser
      models/model.pt         # the expert's state dict (torch.save), keys backbone.* and head.*
      docs/README.md          # what the model is, how to load it

``network_def`` rebuilds the plain expert ``nn.Sequential(OrderedDict(backbone=..., head=...))`` from
``_target_`` entries: ``network_backbone`` (the backbone's factory, a MONAI network
``monai.networks.nets.*`` for the MONAI ResNets and segmentation bodies) and ``network_head``
(``torch.nn.Linear`` or ``torch.nn.ConvNd`` with kernel 1), joined by the expression
``$torch.nn.Sequential(collections.OrderedDict(backbone=@network_backbone, head=@network_head))``. Such a
bundle loads with MONAI alone. A backbone built by a lorkd factory (DenseNet121 without its last layer,
torchvision/timm feature models) keeps its lorkd ``_target_``; the metadata says so
(``lorkd_required: true``, ``required_packages_version.lorkd``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import monai
import numpy as np
import torch
from torch import nn

from importlib.metadata import version as _package_version

lorkd_version = _package_version("lorkd")  # the installed package (`pip install -e .` in dev)
from ...data.segmentation import NORMALIZE_DETAILS, NORMALIZE_TRANSFORMS
from ...errors import ConfigError
from ...fileio import write_atomic, write_json
from ...models.foundation import load_foundation
from .export_formats import TOLERANCE

__all__ = ["BUNDLE_DIR", "METADATA_SCHEMA", "bundle_network_def", "check_bundle", "write_bundle"]

BUNDLE_DIR = "bundle"
#: The MONAI bundle metadata schema the written ``metadata.json`` follows.
METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
_SEQUENTIAL = "$torch.nn.Sequential(collections.OrderedDict(backbone=@network_backbone, head=@network_head))"
_PLAIN = {"lorkd.models.classifier.plain_classifier", "lorkd.models.segmenter.plain_segmenter"}


def bundle_network_def(spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The ``inference.json`` entries that build the expert of architecture ``spec``.

    Returns ``(entries, needs_lorkd)``: ``entries`` holds ``network_backbone``, ``network_head`` and
    ``network_def`` for a plain classifier/segmenter spec (``{"factory", "kwargs"}`` of
    :func:`lorkd.models.classifier.plain_classifier` / :func:`lorkd.models.segmenter.plain_segmenter`),
    or only ``network_def`` (the spec's own factory as ``_target_``) for any other spec;
    ``needs_lorkd`` is whether a ``_target_`` lies in lorkd.
    """
    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("factory") not in _PLAIN:
        return {"network_def": {"_target_": spec["factory"], **kwargs}}, str(spec["factory"]).startswith("lorkd.")
    backbone = kwargs["backbone"]
    features, classes = int(kwargs["feature_dim"]), int(kwargs["num_classes"])
    if spec["factory"].endswith("plain_classifier"):
        head = {"_target_": "torch.nn.Linear", "in_features": features, "out_features": classes}
    else:
        head = {"_target_": f"torch.nn.Conv{int(kwargs['spatial_dims'])}d", "in_channels": features,
                "out_channels": classes, "kernel_size": 1}
    entries = {"network_backbone": {"_target_": backbone["factory"], **backbone.get("kwargs", {})},
               "network_head": head, "network_def": _SEQUENTIAL}
    return entries, str(backbone["factory"]).startswith("lorkd.")


def write_bundle(model: nn.Module, spec: dict[str, Any], card: dict[str, Any], folder: str | Path) -> Path:
    """Write the plain expert ``model`` (built from ``spec``) as a MONAI bundle into ``folder``.

    Args:
        model: the plain expert ``[B, C, *spatial] -> [B, K]`` (classifier) or ``[B, K, *spatial]``
            (segmenter); its state dict goes to ``models/model.pt``.
        spec: its architecture spec ``{"factory", "kwargs"}``.
        card: the expert's card (task, classes, channels, sizes, normalisation / preprocessing).
        folder: the bundle folder (``experts/<task>/bundle``), created if needed.

    Returns the folder.
    """
    folder = Path(folder)
    entries, needs_lorkd = bundle_network_def(spec)
    segmentation = card.get("task_kind") == "segmentation"
    inference = {"imports": ["$import collections"], "bundle_root": ".",
                 "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')", **entries,
                 "network": "$@network_def.to(@device)", "inferer": _inferer(card)}
    if segmentation:
        inference["preprocessing"] = _seg_preprocessing(card)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    write_atomic(folder / "models" / "model.pt", lambda p: torch.save(state, p))
    write_json(folder / "configs" / "inference.json", inference)
    write_json(folder / "configs" / "metadata.json", _metadata(card, spec, needs_lorkd, segmentation))
    readme = _readme(card, needs_lorkd, segmentation)
    write_atomic(folder / "docs" / "README.md", lambda p: Path(p).write_text(readme))
    return folder


@torch.no_grad()
def check_bundle(model: nn.Module, folder: str | Path, input_shape: Sequence[int], key: str = "export.bundle") -> dict[str, Any]:
    """Load the bundle in ``folder`` as lorkd's ``teacher.source.kind: monai_bundle`` does (MONAI's
    ``ConfigParser`` builds ``network_def``, ``models/model.pt`` loads strictly) and compare its outputs
    with ``model``'s on a random input ``[2, *input_shape]``; returns the card's ``files`` entry.

    Raises:
        ConfigError: the bundle does not load, or its outputs differ by more than
            :data:`~lorkd.pipelines.core.export_formats.TOLERANCE` (the folder is then removed).
    """
    folder = Path(folder)
    model = copy.deepcopy(model).cpu().eval()
    x = torch.randn(2, *(int(s) for s in input_shape), generator=torch.Generator().manual_seed(0))
    try:
        loaded = load_foundation("monai_bundle", folder, key=key)
        diff = float((loaded(x) - model(x)).abs().max())
    except Exception as err:  # a bundle that does not load or run is the export's fault: say so, remove it
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"{key}: the bundle written to {folder} does not load or run ({type(err).__name__}: {err}); "
                          "the folder was removed") from err
    if not diff <= TOLERANCE:  # NaN fails too
        shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"{key}: the bundle in {folder} differs from PyTorch by {diff:.3g} (> {TOLERANCE:g}); "
                          "the folder was removed")
    return {"file": f"{folder.name}/", "format": "monai_bundle", "checked_with": f"monai.bundle.ConfigParser, monai "
            f"{monai.__version__}", "checked_shapes": [list(x.shape)], "max_abs_diff": diff}


def _inferer(card: dict[str, Any]) -> dict[str, Any]:
    """A SimpleInferer (classifier), or the SlidingWindowInferer of the card's ``inference`` settings."""
    inf = card.get("inference")
    if card.get("task_kind") != "segmentation" or not inf:
        return {"_target_": "SimpleInferer"}
    return {"_target_": "SlidingWindowInferer", "roi_size": inf["roi_size"], "sw_batch_size": inf["sw_batch_size"],
            "overlap": inf["overlap"], "mode": inf["mode"]}


def _seg_preprocessing(card: dict[str, Any]) -> dict[str, Any]:
    """The MONAI array transform of the card's intensity normalisation (per channel, exactly as lorkd
    computes it: :data:`~lorkd.data.segmentation.NORMALIZE_TRANSFORMS`) for an image ``[C, *spatial]``."""
    return dict(NORMALIZE_TRANSFORMS[(card.get("preprocessing") or {}).get("normalize", "none")])


def _seg_normalisation(card: dict[str, Any]) -> dict[str, Any]:
    """The card's ``preprocessing`` with exactly what its normalisation computes (per channel) and how
    the bundle applies it."""
    pre = dict(card.get("preprocessing") or {"normalize": "none"})
    mode = pre.get("normalize", "none")
    resampled = [k for k in ("scale", "target_spacing", "target_shape") if pre.get(k) is not None]
    return {**pre, "normalize_per": "channel", "normalize_detail": NORMALIZE_DETAILS[mode],
            "in_bundle": "configs/inference.json 'preprocessing' (" + json.dumps(NORMALIZE_TRANSFORMS[mode]) + ") computes "
                         "this normalisation on one image [C, *spatial]; apply it, add the batch axis, then 'inferer' "
                         "with 'network', then argmax over the channel axis"
                         + (f"; the resampling ({', '.join(resampled)}) is not in the bundle: resample the image "
                            "before and the logits back after, as lorkd predict does" if resampled else "")}


def _metadata(card: dict[str, Any], spec: dict[str, Any], needs_lorkd: bool, segmentation: bool) -> dict[str, Any]:
    task, classes = str(card.get("task", "expert")), int(card["classes"])
    channels = int(card.get("input_channels", card.get("in_channels", 1)))
    kind = "segmentation" if segmentation else "classification"
    shape = list(card.get("patch_size") if segmentation else card.get("input_size") or [])
    normalisation = _seg_normalisation(card) if segmentation else card.get("normalisation")
    output = (f"logits [B, {classes}, *spatial], not probabilities: argmax over axis 1 gives the class index map, "
              "softmax over axis 1 the probabilities" if segmentation else
              f"logits [B, {classes}], not probabilities: softmax over axis 1 gives the class probabilities")
    names = card.get("class_names") or [str(k) for k in range(classes)]
    output_shape = shape if segmentation else [classes]
    packages = {"lorkd": lorkd_version} if needs_lorkd else {}
    return {
        "schema": METADATA_SCHEMA, "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by lorkd {lorkd_version}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": packages, "optional_packages_version": {},
        "name": f"lorkd expert {task}", "task": f"{task} ({kind})",
        "description": f"The low-rank expert of task {task!r} distilled by lorkd (LoRKD), merged into a plain "
                       f"{spec.get('kwargs', {}).get('backbone', spec).get('factory')} backbone + "
                       f"{'1x1 convolution' if segmentation else 'linear'} head; {kind} into {classes} classes.",
        "authors": "lorkd", "copyright": "the owner of the training data and run",
        "lorkd_required": needs_lorkd, "intensity_normalisation": normalisation,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "unknown",
                                 "num_channels": channels, "spatial_shape": shape, "dtype": "float32",
                                 "value_range": _value_range(normalisation, segmentation),
                                 "is_patch_data": segmentation,
                                 "channel_def": {str(c): f"channel {c}" for c in range(channels)}}},
            "outputs": {"pred": {"type": "image" if segmentation else "logits", "format": kind, "description": output,
                                 "num_channels": classes, "spatial_shape": output_shape, "dtype": "float32",
                                 "value_range": [], "is_patch_data": segmentation, "is_onehot": False,
                                 "channel_def": {str(k): str(n) for k, n in enumerate(names)}}},
        },
    }


def _value_range(normalisation: dict[str, Any] | None, segmentation: bool) -> list[float]:
    """The network input's range after normalisation, where it is bounded: ``minmax`` -> [0, 1]; a
    classifier's ``(x / 255 - mean) / std`` -> [(0 - mean) / std, (1 - mean) / std]; else [] (unbounded)."""
    if not normalisation:
        return []
    if segmentation:
        return [0.0, 1.0] if normalisation.get("normalize") == "minmax" else []
    mean, std = np.asarray(normalisation["mean"], float), np.asarray(normalisation["std"], float)
    return [float(np.min((0 - mean) / std)), float(np.max((1 - mean) / std))]


def _readme(card: dict[str, Any], needs_lorkd: bool, segmentation: bool) -> str:
    task, classes = card.get("task", "expert"), card["classes"]
    out = "[B, K, *spatial] logits" if segmentation else "[B, K] logits"
    load = ("The backbone is built by a lorkd factory: install lorkd to instantiate `network_def`."
            if needs_lorkd else "`network_def` uses MONAI and PyTorch only; lorkd is not needed to load it.")
    return (f"# lorkd expert: {task}\n\n"
            f"The expert of task `{task}` exported by lorkd: a plain `nn.Sequential(backbone, head)` "
            f"mapping `[B, C, *spatial]` images to {out} over {classes} classes (no task ids, no lorkd layers).\n"
            f"Input format, intensity normalisation and class names: `configs/metadata.json`"
            + (" (the normalisation is per channel: `configs/inference.json`'s `preprocessing` computes it on one "
               "image `[C, *spatial]`; then add the batch axis, run `inferer` with `network`, argmax over axis 1)"
               if segmentation else "") + ".\n\n"
            f"## Load\n\n{load}\n\n"
            "```python\nimport torch\nfrom monai.bundle import ConfigParser\n\n"
            "parser = ConfigParser()\nparser.read_config(\"configs/inference.json\")\n"
            "net = parser.get_parsed_content(\"network_def\")\n"
            "net.load_state_dict(torch.load(\"models/model.pt\", weights_only=True))\nnet.eval()\n```\n\n"
            "In lorkd: `lorkd.models.foundation.load_foundation(\"monai_bundle\", \"<this folder>\")`, or "
            "`teacher.source: {kind: monai_bundle, path: <this folder>}`.\n")
