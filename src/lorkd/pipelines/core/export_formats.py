"""Extra export formats of an expert: ONNX and TorchScript, each reloaded and checked against PyTorch.

An expert is always written as ``expert.safetensors`` + ``card.json`` (:func:`lorkd.experts.save_expert`).
:func:`write_formats` adds, on request:

- ``expert.onnx``: ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter, the
  default since PyTorch 2.9), weights embedded in the file, input ``image`` ``[B, C, *spatial]`` with a
  dynamic batch axis (and dynamic spatial axes for segmentation), output ``logits``. It is loaded with
  ONNX Runtime (CPU) and compared to the PyTorch model on random inputs.
- ``expert.torchscript.pt``: ``torch.jit.trace`` of the model, reloaded with ``torch.jit.load`` and
  compared the same way (PyTorch marks TorchScript as deprecated; it still loads without Python code).

Dynamic spatial axes: an encoder-decoder network (UNet) runs only on sizes that are multiples of
its total stride (``2 ** (levels - 1)``): other sizes fail inside, where a skip connection is
concatenated with an upsampled map of another size. The multiple is measured
(:func:`spatial_multiple`), and the ONNX graph pads its input with zeros at the end of each spatial
axis up to it and crops the logits back (:class:`PadToMultiple`), so the file runs on every size it
declares; it is also checked on a size one voxel past the patch. The TorchScript trace cannot
carry that padding (a trace fixes the pad amounts): its card entry records ``spatial_multiple``,
which its inputs must respect.

Neither file holds a lorkd module: they are traces of the plain exported expert (the ONNX one with
the pad and crop). The card lists every file with its format and the largest absolute difference
measured. A file whose outputs differ from PyTorch by more than :data:`TOLERANCE` is deleted and
reported as an error.
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
import torch.nn.functional as F
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


class PadToMultiple(nn.Module):
    """``[B, C, *spatial] -> [B, K, *spatial]``: ``model`` on the input zero-padded at the end of
    each spatial axis to the next multiple of ``multiples`` (one per axis), logits cropped back.
    On sizes that are already multiples it is ``model`` itself (no padding, same values)."""

    def __init__(self, model: nn.Module, multiples: Sequence[int]) -> None:
        super().__init__()
        self.model, self.multiples = model, tuple(int(m) for m in multiples)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = x.shape[2:]
        pads: list[int] = []
        for size, m in zip(reversed(sizes), reversed(self.multiples)):  # F.pad takes the last axis first
            pads += [0, (m - size % m) % m]
        y = self.model(F.pad(x, pads))
        return y[(slice(None), slice(None), *(slice(0, size) for size in sizes))]


@torch.no_grad()
def spatial_multiple(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Per spatial axis, the step of the sizes ``model`` runs on: the smallest divisor ``m`` of the
    axis's size in ``input_shape`` (``[C, *spatial]``, a size the model runs on) such that the
    model maps an input ``m`` larger along that axis to logits of that size (a UNet of ``n``
    stride-2 levels: ``2 ** n``; ``1``: any size). The axis's own size when no divisor does.
    ``model`` runs in eval mode on zeros (``len(divisors)`` forward passes per axis at most)."""
    channels, *sizes = (int(s) for s in input_shape)
    was = model.training
    model.eval()
    found = []
    try:
        for axis, size in enumerate(sizes):
            step = size
            for m in (d for d in range(1, size + 1) if size % d == 0):
                probe = [*sizes[:axis], size + m, *sizes[axis + 1:]]
                try:
                    y = model(torch.zeros(1, channels, *probe))
                except (RuntimeError, ValueError, IndexError):  # sizes that do not fit the network's strides
                    continue
                if list(y.shape[2:]) == probe:
                    step = m
                    break
            found.append(step)
    finally:
        model.train(was)
    return tuple(found)


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
        dynamic_spatial: also mark the spatial axes of the ONNX input dynamic (segmentation experts):
            the ONNX graph pads inputs to the network's :func:`spatial_multiple` (:class:`PadToMultiple`)
            and both entries record ``spatial_multiple``.
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
    multiples = spatial_multiple(model, shape) if dynamic_spatial and (onnx or torchscript) else None
    for wanted, name, writer in ((onnx, ONNX_FILE, _write_onnx), (torchscript, TORCHSCRIPT_FILE, _write_torchscript)):
        path = folder / name
        if not wanted:
            path.unlink(missing_ok=True)
            continue
        files.append(writer(model, path, checks, opset=opset, multiples=multiples, key=key))
    return files


def _write_onnx(model: nn.Module, path: Path, checks: list[torch.Tensor], opset: int | None,
                multiples: tuple[int, ...] | None, key: str) -> dict[str, Any]:
    """``multiples``: dynamic spatial axes, the graph padding inputs to these multiples (``None``:
    only the batch axis is dynamic)."""
    require_onnx(f"{key}.onnx")
    import onnx
    import onnxruntime as ort

    example, dynamic_spatial = checks[0], multiples is not None
    padded = dynamic_spatial and max(multiples) > 1
    if padded:
        model = PadToMultiple(model, multiples).eval()
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
        if padded:  # and one past the patch on every axis, which only the padding makes valid
            odd = (1, example.shape[1], *(s + 1 for s in example.shape[2:]))
            checks = checks + [torch.randn(*odd, generator=torch.Generator().manual_seed(2))]
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
    entry = {"file": path.name, "format": "onnx", "opset": written,
             "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}", "input": "image",
             "output": "logits", "input_shape": [d if isinstance(d, int) else "dynamic" for d in dims],
             "checked_with": f"onnxruntime {ort.__version__} (CPU)", "checked_shapes": [list(x.shape) for x in checks],
             "max_abs_diff": diff}
    if dynamic_spatial:
        entry["spatial_multiple"] = list(multiples)
        entry["padding"] = ("inside the graph: each spatial axis zero-padded at its end to a multiple of "
                            "spatial_multiple, logits cropped back; any size runs" if padded else
                            "none: the network runs on any size")
    return entry


def _write_torchscript(model: nn.Module, path: Path, checks: list[torch.Tensor], key: str,
                       multiples: tuple[int, ...] | None = None, **_: Any) -> dict[str, Any]:
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
    entry = {"file": path.name, "format": "torchscript", "exporter": f"torch.jit.trace, torch {torch.__version__}",
             "checked_with": "torch.jit.load", "checked_shapes": [list(x.shape) for x in checks], "max_abs_diff": diff}
    if multiples is not None:  # a trace cannot pad by a size-dependent amount: the caller must
        entry["spatial_multiple"] = list(multiples)
        entry["padding"] = ("none: spatial sizes must be multiples of spatial_multiple (pad the input with zeros "
                            "and crop the logits)" if max(multiples) > 1 else "none: the network runs on any size")
    return entry


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
