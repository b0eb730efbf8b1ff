"""Export formats of experts: ONNX (checked with ONNX Runtime) and TorchScript, listed in the card."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from lorkd import cli
from lorkd.errors import ConfigError
from lorkd.experts import load_expert
from lorkd.models.backbones import backbone_spec
from lorkd.models.classifier import MultiTaskClassifier
from lorkd.pipelines.core import export_formats as X

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def _plain_classifier(spatial_dims: int) -> nn.Module:
    torch.manual_seed(0)
    model = MultiTaskClassifier(backbone_spec("resnet10", spatial_dims, 1, widen=0.125), [3, 2], {"rank": 2, "alpha": 4})
    for p in model.parameters():  # non-zero experts, so the merged weights differ from the shared ones
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval().export_task(1)[0]


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def test_torchscript_of_a_classifier_expert_matches_pytorch(tmp_path):
    model = _plain_classifier(2)
    files = X.write_formats(model, tmp_path, (1, 16, 16), torchscript=True)
    assert [(f["file"], f["format"]) for f in files] == [("expert.safetensors", "safetensors (PyTorch state dict)"),
                                                        ("expert.torchscript.pt", "torchscript")]
    assert files[1]["checked_shapes"] == [[2, 1, 16, 16], [1, 1, 16, 16]] and 0 <= files[1]["max_abs_diff"] <= 1e-4
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        diff = (torch.jit.load(str(tmp_path / "expert.torchscript.pt"))(x) - model(x)).abs().max()
    assert diff <= 1e-4


@pytest.mark.slow  # the ONNX exporter takes seconds to load and trace
def test_3d_classifier_expert_onnx_and_torchscript_match_pytorch(tmp_path, caplog, capfd):
    model = _plain_classifier(3)
    shape = (1, 8, 8, 8)
    capfd.readouterr()
    with caplog.at_level(logging.INFO):  # as the CLI logs: the exporter's passes say nothing
        files = X.write_formats(model, tmp_path, shape, onnx=True, torchscript=True, opset=18)
    assert not caplog.records and capfd.readouterr() == ("", "")
    assert [f["file"] for f in files] == ["expert.safetensors", "expert.onnx", "expert.torchscript.pt"]
    onnx_entry, ts_entry = files[1], files[2]
    assert onnx_entry["format"] == "onnx" and onnx_entry["input_shape"] == ["dynamic", *shape]
    assert onnx_entry["opset"] == 18
    assert 0 <= onnx_entry["max_abs_diff"] <= 1e-4 and 0 <= ts_entry["max_abs_diff"] <= 1e-4
    x = torch.randn(5, *shape)  # a batch size the export never saw
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_ort(tmp_path / "expert.onnx", x) - expected).max() <= 1e-4
    scripted = torch.jit.load(str(tmp_path / "expert.torchscript.pt"))
    assert np.abs(scripted(x).detach().numpy() - expected).max() <= 1e-4
    # the files hold plain ops only: no lorkd code is needed (or named) to run them
    assert b"lorkd" not in (tmp_path / "expert.onnx").read_bytes()
    # asking for no format removes stale files of an earlier export
    assert [f["file"] for f in X.write_formats(model, tmp_path, shape)] == ["expert.safetensors"]
    assert not (tmp_path / "expert.onnx").exists() and not (tmp_path / "expert.torchscript.pt").exists()


class _Branchy(nn.Module):
    """Python control flow on the batch size: a trace records one branch only, so it differs from eager."""

    def forward(self, x):
        return x.flatten(1)[:, :2] * (2.0 if x.shape[0] > 1 else -3.0)


def test_a_file_that_differs_from_pytorch_is_an_error_and_removed(tmp_path):
    with pytest.raises(ConfigError, match=r"export.torchscript: .*expert.torchscript.pt differs from PyTorch by .* \(> 0.0001\)"):
        X.write_formats(_Branchy(), tmp_path, (1, 4, 4), torchscript=True)
    assert not (tmp_path / "expert.torchscript.pt").exists()


def test_missing_onnx_packages_name_the_key_and_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    path = tmp_path / "c.yaml"
    path.write_text("data: {synthetic: {}}\nexport: {onnx: true}\n")
    with pytest.raises(ConfigError, match=r"export.onnx: .*onnxruntime.*pip install lorkd\[onnx\]"):
        cli.load_recipe(path, [])
    cfg = cli.load_recipe(path, ["export.onnx=false", "export.torchscript=true"])  # TorchScript needs nothing more
    assert cfg.export.torchscript and not cfg.export.onnx
    with pytest.raises(ConfigError, match=r"export.opset: must be an ONNX opset >= 18"):
        cli.load_recipe(path, ["export.onnx=false", "export.opset=13"])


def test_class_names_from_the_config_or_a_known_medmnist_file():
    assert X.class_names("data/breastmnist.npz", 2) == ["malignant", "normal, benign"]
    assert X.class_names("/x/organamnist_64.npz", 11)[10] == "spleen"
    assert X.class_names("pneumoniamnist/pneumoniamnist_reconstructed.npz", 2) == ["normal", "pneumonia"]
    assert X.class_names("/x/breastmnist.npz", 3) is None  # a relabelled file: names would be wrong
    assert X.class_names("synthetic", 2) is None
    assert X.class_names("any.npz", 2, ["no", "yes"]) == ["no", "yes"]
    with pytest.raises(ConfigError, match=r"data.tasks\[0\].class_names: 1 names given for a task of 2 classes"):
        X.class_names("any.npz", 2, ["no"], "data.tasks[0].class_names")


# ------------------------------------------------------------------ both recipes end to end
@pytest.mark.slow
def test_classification_recipe_exports_onnx_and_torchscript(tmp_path):
    cfg = {"data": {"synthetic": {"num_tasks": 1, "size": 16, "n_train": 32, "n_val": 16, "n_test": 16}},
           "teacher": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 1, "batch_size": 16}},
           "student": {"net": {"arch": "resnet10", "widen": 0.125}, "train": {"epochs": 1, "batch_size": 16}},
           "export": {"onnx": True, "torchscript": True}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert cli.main(["pretrain", str(path), "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["export", str(path), "--out", str(out), "--no-progress"]) == 0
    folder = out / "experts" / "synth_ultrasound"
    _check_exported(folder, torch.rand(3, 1, 16, 16))


@pytest.mark.slow
def test_segmentation_recipe_exports_onnx_with_dynamic_spatial_axes(tmp_path):
    from test_segmentation import tiny_config, write_png_task

    root = write_png_task(tmp_path / "pngs", n=6)
    cfg = tiny_config([{"name": "polyp", "path": str(root), "format": "folder"}], [16, 16],
                      export={"onnx": True, "torchscript": True})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert cli.main(["pretrain", str(path), "--out", str(out), "--no-progress"]) == 0
    assert cli.main(["export", str(path), "--out", str(out), "--no-progress"]) == 0
    card = _check_exported(out / "experts" / "polyp", torch.randn(2, 1, 32, 48))  # not the patch size
    assert card["files"][1]["input_shape"] == ["dynamic", 1, "dynamic", "dynamic"]


@pytest.mark.parametrize("arch", ["unet", "dynunet", "segresnet"])
def test_spatial_multiple_is_the_total_stride(arch):
    from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec

    plain = MultiTaskSegmenter(segmentation_backbone_spec(arch, 2, 1, [4, 8, 8], 4), [2]).export_task(0)[0]
    assert X.spatial_multiple(plain, (1, 16, 24)) == (4, 4)  # three levels: two stride-2 steps
    assert X.spatial_multiple(nn.Conv2d(1, 2, 3, padding=1), (1, 6, 6)) == (1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_onnx_runs_on_sizes_off_the_network_multiple(tmp_path, dims):
    """A UNet's skip concatenation fails on sizes that are not multiples of its stride; the ONNX
    graph pads to the multiple inside and crops back, the TorchScript entry records the multiple."""
    from lorkd.models.segmenter import MultiTaskSegmenter, segmentation_backbone_spec

    torch.manual_seed(0)
    plain = MultiTaskSegmenter(segmentation_backbone_spec("unet", dims, 1, [4, 8, 8], 4), [3]).export_task(0)[0].eval()
    patch = (1, 16, 16) if dims == 2 else (1, 8, 8, 8)
    files = X.write_formats(plain, tmp_path, patch, onnx=True, torchscript=True, dynamic_spatial=True)
    onnx_entry, ts_entry = files[1], files[2]
    assert onnx_entry["spatial_multiple"] == ts_entry["spatial_multiple"] == [4] * dims
    assert onnx_entry["padding"].startswith("inside the graph") and "must be multiples" in ts_entry["padding"]
    assert [1, 1, *(s + 1 for s in patch[1:])] in onnx_entry["checked_shapes"]
    odd = (5, 17, 18) if dims == 2 else (5, 9, 10)  # none a multiple of 4
    x = torch.randn(1, 1, *odd[3 - dims:] if dims == 2 else odd)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):  # the network itself cannot
        plain(x)
    with torch.no_grad():  # the reference: zero-pad to the multiple by hand, crop the logits back
        up = [-(-s // 4) * 4 for s in x.shape[2:]]
        pads = [p for s, u in zip(reversed(x.shape[2:]), reversed(up)) for p in (0, u - s)]
        expected = plain(torch.nn.functional.pad(x, pads))[(slice(None), slice(None), *(slice(0, s) for s in x.shape[2:]))]
    got = _ort(tmp_path / "expert.onnx", x)
    assert got.shape == (1, 3, *x.shape[2:]) and np.abs(got - expected.numpy()).max() <= 1e-4
    with pytest.raises(RuntimeError):  # the trace runs the network as it is: its entry says so
        torch.jit.load(str(tmp_path / "expert.torchscript.pt"))(x)
    y = torch.randn(2, 1, *(2 * s for s in patch[1:]))  # on multiples the padding changes nothing
    with torch.no_grad():
        assert np.abs(_ort(tmp_path / "expert.onnx", y) - plain(y).numpy()).max() <= 1e-4


def _check_exported(folder: Path, x: torch.Tensor) -> dict:
    card = json.loads((folder / "card.json").read_text())
    assert [(f["file"], f["format"]) for f in card["files"]] == [
        ("expert.safetensors", "safetensors (PyTorch state dict)"), ("expert.onnx", "onnx"),
        ("expert.torchscript.pt", "torchscript")]
    assert all(f["max_abs_diff"] <= 1e-4 for f in card["files"][1:])
    model = load_expert(folder).eval()
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(_ort(folder / "expert.onnx", x) - expected).max() <= 1e-4
    assert np.abs(torch.jit.load(str(folder / "expert.torchscript.pt"))(x).detach().numpy() - expected).max() <= 1e-4
    return card
