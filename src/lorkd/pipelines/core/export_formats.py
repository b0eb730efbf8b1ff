"""Extra export formats of an expert: ONNX and TorchScript, each reloaded and checked against PyTorch.

An expert is always written as ``expert.safetensors`` + ``card.json`` (:func:`lorkd.experts.save_expert`).
:func:`write_formats` adds, on request:

- ``expert.onnx``: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, the
  default since PyTorch 2.9), weights embedded in the file, input ``image`` ``[B, C, *spatial]`` with a
  dynamic batch axis (and dynamic spatial axes for segmentation), output ``logits``. It is loaded with
  ONNX Runtime (CPU) and compared to the PyTorch model on random inputs.
- ``expert.torchscript.pt``: ``torch.jit.trace`` of the model, reloaded with ``torch.jit.load`` and
  compared the same way (PyTorch marks TorchScript as deprecated; it still loads without Python code).

Neither file holds a lorkd module: they are traces of the plain exported expert. The card lists
every file with its format and the largest absolute difference measured. A file whose outputs differ
from PyTorch by more than :data:`TOLERANCE` is deleted and reported as an error.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from ...errors import ConfigError
from ..schema.sections import ONNX_PACKAGES, require_onnx

ONNX_FILE, TORCHSCRIPT_FILE = "expert.onnx", "expert.torchscript.pt"
TOLERANCE = 1e-4  # largest absolute difference of any output value accepted between a file and PyTorch

# Class names of the MedMNIST v2 subsets in ../shared/data (the `label` field of the INFO dict of
# the `medmnist` package), found by the file's name up to its first "_" (``breastmnist.npz``,
# ``breastmnist_64.npz``, ``pneumoniamnist_reconstructed.npz``) when the class count agrees.
MEDMNIST_CLASS_NAMES = {
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "organamnist": ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver",
                    "lung-left", "lung-right", "pancreas", "spleen"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"],
    "adrenalmnist3d": ["normal", "hyperplasia"],
    "vesselmnist3d": ["vessel", "aneurysm"],
}


def class_names(source: str | Path | None, num_classes: int, given: Sequence[str] | None = None,
                key: str = "data.tasks[].class_names") -> list[str] | None:
    """Names of a task's classes: ``given`` (from the config), else those of a known MedMNIST file, else ``None``.

    Raises:
        ConfigError: ``given`` does not hold exactly ``num_classes`` names (names ``key``).
    """
    if given is not None:
        if len(given) != num_classes:
            raise ConfigError(f"{key}: {len(given)} names given for a task of {num_classes} classes")
        return [str(n) for n in given]
    if source is None:
        return None
    names = MEDMNIST_CLASS_NAMES.get(Path(str(source)).name.lower().removesuffix(".npz").split("_")[0])
    return list(names) if names is not None and len(names) == num_classes else None


def write_formats(model: nn.Module, folder: str | Path, input_shape: Sequence[int], onnx: bool = False,
                  torchscript: bool = False, opset: int | None = None, dynamic_spatial: bool = False,
                  key: str = "export") -> list[dict[str, Any]]:
    """Write ``model`` as ONNX and/or TorchScript into ``folder`` and check each file against PyTorch.

    Args:
        model: the plain expert, ``[B, *input_shape] -> [B, K, ...]`` (copied, run on the CPU in eval mode).
        folder: the expert's folder; a format not asked for has its stale file removed.
        input_shape: one input without the batch axis, ``[C, H, W]`` or ``[C, D, H, W]``.
        onnx, torchscript: which formats to write.
        opset: ONNX opset (``None``: the exporter's default); another opset written is an error.
        dynamic_spatial: also mark the spatial axes of the ONNX input dynamic (segmentation experts).
        key: the config section, for error messages.

    Returns:
        The card's ``files`` list: ``expert.safetensors`` (written by ``save_expert``) and one entry per
        format with ``file``, ``format``, ``max_abs_diff`` and the input shapes it was checked on.

    Raises:
        ConfigError: the ONNX packages are missing, the exporter fails, or a reloaded file's outputs
            differ from PyTorch by more than :data:`TOLERANCE` (the file is then deleted).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    shape = tuple(int(s) for s in input_shape)
    gen = torch.Generator().manual_seed(0)
    checks = [torch.randn(2, *shape, generator=gen), torch.randn(1, *shape, generator=gen)]
    files: list[dict[str, Any]] = [{"file": "expert.safetensors", "format": "safetensors (PyTorch state dict)"}]
    for wanted, name, writer in ((onnx, ONNX_FILE, _write_onnx), (torchscript, TORCHSCRIPT_FILE, _write_torchscript)):
        path = folder / name
        if not wanted:
            path.unlink(missing_ok=True)
            continue
        files.append(writer(model, path, checks, opset=opset, dynamic_spatial=dynamic_spatial, key=key))
    return files


def _write_onnx(model: nn.Module, path: Path, checks: list[torch.Tensor], opset: int | None,
                dynamic_spatial: bool, key: str) -> dict[str, Any]:
    require_onnx(f"{key}.onnx")
    import onnx
    import onnxruntime as ort

    example = checks[0]
    axes = {0: Dim.DYNAMIC, **({d: Dim.DYNAMIC for d in range(2, example.ndim)} if dynamic_spatial else {})}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _quiet():
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamo=True, dynamic_shapes=(axes,), opset_version=opset, external_data=False,
                              verbose=False)
    except Exception as err:  # the exporter raises many types; the user's recourse is the config key
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{key}.onnx: torch.onnx.export failed for {path.parent}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}; set {key}.onnx: false") from err
    tmp.replace(path)
    proto = onnx.load(str(path))
    written = int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))
    if opset is not None and written != opset:
        path.unlink()
        raise ConfigError(f"{key}.opset: asked for opset {opset}, the exporter wrote {written}; the file was removed")
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if dynamic_spatial and all(isinstance(d, str) for d in dims[2:]):
        # the spatial axes are dynamic: check a larger input too (twice the size keeps pooling strides valid)
        big = (1, example.shape[1], *(2 * s for s in example.shape[2:]))
        checks = checks + [torch.randn(*big, generator=torch.Generator().manual_seed(1))]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diff = _compare(model, lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), checks, path,
                        f"{key}.onnx")
    except ConfigError:
        raise
    except Exception as err:  # ONNX Runtime's own error types (an operator it lacks, a shape it refuses)
        path.unlink(missing_ok=True)
        raise ConfigError(f"{key}.onnx: ONNX Runtime cannot run {path} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); the file was removed") from err
    return {"file": path.name, "format": "onnx", "opset": written,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", "input": "image", "output": "logits",
            "input_shape": [d if isinstance(d, int) else "dynamic" for d in dims],
            "checked_with": f"onnxruntime {ort.__version__} (CPU)", "checked_shapes": [list(x.shape) for x in checks],
            "max_abs_diff": diff}


def _write_torchscript(model: nn.Module, path: Path, checks: list[torch.Tensor], key: str, **_: Any) -> dict[str, Any]:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _quiet(), torch.no_grad():
            torch.jit.trace(model, checks[0], check_trace=False).save(str(tmp))
    except Exception as err:  # tracing raises many types; the user's recourse is the config key
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{key}.torchscript: torch.jit.trace failed for {path.parent}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}; set {key}.torchscript: false") from err
    tmp.replace(path)
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    diff = _compare(model, lambda x: loaded(x), checks, path, f"{key}.torchscript")
    return {"file": path.name, "format": "torchscript", "exporter": f"torch.jit.trace, torch {torch.__version__}",
            "checked_with": "torch.jit.load", "checked_shapes": [list(x.shape) for x in checks], "max_abs_diff": diff}


@torch.no_grad()
def _compare(model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], checks: list[torch.Tensor], path: Path,
             key: str) -> float:
    """Largest ``|exported(x) - model(x)|`` over ``checks``; deletes ``path`` and raises ConfigError above TOLERANCE."""
    worst = 0.0
    for x in checks:
        expected, got = model(x), exported(x)
        if tuple(got.shape) != tuple(expected.shape):
            path.unlink(missing_ok=True)
            raise ConfigError(f"{key}: {path} gives outputs of shape {list(got.shape)} for input {list(x.shape)}, "
                              f"PyTorch {list(expected.shape)}; the file was removed")
        worst = max(worst, float(np.max(np.abs(got.float().numpy() - expected.float().numpy()))))
    if not worst <= TOLERANCE:  # NaN fails too
        path.unlink(missing_ok=True)
        raise ConfigError(f"{key}: {path} differs from PyTorch by {worst:.3g} (> {TOLERANCE:g}) on random inputs "
                          f"{[list(x.shape) for x in checks]}; the file was removed")
    return worst


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress lines and deprecation warnings while they run."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.onnx._internal.exporter._registration",
             "onnx_ir", "onnxscript")  # the optimiser passes log every step at INFO
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
